//! Limits on what one statement may ask of the planner, checked on its tokens before any
//! parser, planner or operator walks it.
//!
//! Parsers, DataFusion's planning and our lowering all recurse over the statement's tree,
//! and a chain of binary operators (`a + a + …`, `x = 1 OR x = 2 OR …`) or of `UNION ALL`
//! branches makes that tree as deep as the chain is long: sqlparser's recursion limit does
//! not count such chains, so a few hundred links used to overflow an engine thread's stack
//! and kill the process. [`check_depth`] bounds the depth from the token stream alone
//! (linear, no recursion, works for our DDL as for DataFusion's SQL), and the engine's
//! threads that plan or evaluate run on stacks sized for that bound
//! (`laminardb_engine::config::ENGINE_STACK_BYTES`).

use datafusion::sql::sqlparser::tokenizer::{Token, Word};

use laminardb_engine::{Error, Result};

/// The deepest nesting a statement may have, as [`nesting_bound`] counts it. Planning time
/// grows faster than linearly with depth (~1–3 s at 500 in a debug build), so this also
/// bounds how long one statement can keep the coordinator.
pub const MAX_SQL_DEPTH: usize = 1000;

/// Most parenthesized groups one inside another (sqlparser itself stops at 50).
pub const MAX_GROUP_NESTING: usize = 32;

/// Most calls of [`BACKTRACKING`] constructs one inside another: sqlparser tries each of
/// them more than one way, so its time doubles with every level (18 nested CASTs took
/// seconds, 30 would take hours).
pub const MAX_BACKTRACKING_NESTING: usize = 10;

/// Most `.` in one chain of names (`a.b.c`): sqlparser tries each part of a malformed
/// chain more than one way, so its time doubles with every part (`t . ts . … . . ts ts . …`
/// with 20 parts on each side of the flaw took 12 s, 40 would take days).
pub const MAX_NAME_CHAIN: usize = 12;

/// Constructs whose parse time grows exponentially with their nesting (measured).
const BACKTRACKING: [&str; 8] = ["CAST", "TRY_CAST", "SAFE_CAST", "POSITION", "CONVERT", "TRY_CONVERT", "OVERLAY", "ROW"];

/// Refuses a statement whose tree could be deeper than [`MAX_SQL_DEPTH`], or whose
/// groups nest deeper than the parser handles in reasonable time.
pub fn check_depth(tokens: &[Token]) -> Result<()> {
    check_nesting(tokens)?;
    let depth = nesting_bound(tokens);
    if depth > MAX_SQL_DEPTH {
        return Err(Error::parse(format!(
            "the statement nests too deeply: about {depth} levels of operators, parentheses, \
             UNION/JOIN branches and CASE, where at most {MAX_SQL_DEPTH} are supported; \
             write long OR/= chains as an IN list, or split the statement"
        )));
    }
    Ok(())
}

/// Refuses clauses DataFusion parses but would ignore, so a statement never runs without
/// them as if they were there: `TABLESAMPLE` (every row would come back).
pub fn check_unsupported(tokens: &[Token]) -> Result<()> {
    let sampled = tokens.iter().any(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("TABLESAMPLE")));
    if sampled {
        return Err(Error::unsupported("TABLESAMPLE (sampling is not implemented; every row would be returned)"));
    }
    Ok(())
}

/// Group nesting, in all and of [`BACKTRACKING`] calls.
fn check_nesting(tokens: &[Token]) -> Result<()> {
    // Per open group: whether it is the argument list of a backtracking construct.
    let mut open: Vec<bool> = Vec::new();
    let mut backtracking = 0usize;
    let mut previous_word: Option<&Word> = None;
    // `.` since the last token that cannot be part of a chain of names.
    let mut dots = 0usize;
    for token in tokens {
        match token {
            Token::Period => {
                dots += 1;
                if dots > MAX_NAME_CHAIN {
                    return Err(Error::parse(format!("the statement chains more than {MAX_NAME_CHAIN} names with '.'")));
                }
            }
            Token::Word(_) | Token::Whitespace(_) => {}
            _ => dots = 0,
        }
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                let call = previous_word
                    .is_some_and(|w| w.quote_style.is_none() && BACKTRACKING.iter().any(|k| w.value.eq_ignore_ascii_case(k)));
                open.push(call);
                backtracking += usize::from(call);
                if open.len() > MAX_GROUP_NESTING {
                    return Err(Error::parse(format!(
                        "the statement nests parentheses more than {MAX_GROUP_NESTING} deep"
                    )));
                }
                if backtracking > MAX_BACKTRACKING_NESTING {
                    return Err(Error::parse(format!(
                        "the statement nests CAST, CONVERT, POSITION, OVERLAY or ROW more than \
                         {MAX_BACKTRACKING_NESTING} deep"
                    )));
                }
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                if open.pop() == Some(true) {
                    backtracking -= 1;
                }
            }
            _ => {}
        }
        match token {
            Token::Word(w) => previous_word = Some(w),
            Token::Whitespace(_) => {}
            _ => previous_word = None,
        }
    }
    Ok(())
}

/// One parenthesized (or bracketed) group being scanned.
#[derive(Default)]
struct Group {
    /// Operators in the current comma- or clause-separated segment of this group.
    ops: usize,
    /// The deepest child group of the current segment.
    child: usize,
    /// The deepest finished segment.
    deepest: usize,
    /// Set operations, joins: they nest the whole group, whatever separates them.
    chained: usize,
}

impl Group {
    fn end_segment(&mut self) {
        self.deepest = self.deepest.max(self.ops + self.child);
        self.ops = 0;
        self.child = 0;
    }

    fn depth(mut self) -> usize {
        self.end_segment();
        self.deepest + self.chained + 1
    }
}

/// An upper bound on the depth of the statement's syntax tree: within each parenthesized
/// group, every operator of one comma- or clause-separated segment may nest the next (a
/// left-deep chain does), set operations and joins nest the whole group, and each group
/// adds its own level to the deepest segment holding it.
pub fn nesting_bound(tokens: &[Token]) -> usize {
    let mut stack = vec![Group::default()];
    for token in tokens {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => stack.push(Group::default()),
            Token::RParen | Token::RBracket | Token::RBrace => {
                if stack.len() > 1 {
                    let depth = stack.pop().map(Group::depth).unwrap_or(0);
                    let parent = stack.last_mut().expect("the outermost group stays");
                    parent.child = parent.child.max(depth);
                }
            }
            Token::Comma | Token::SemiColon => stack.last_mut().expect("nonempty").end_segment(),
            Token::Word(word) => {
                let top = stack.last_mut().expect("nonempty");
                match word_role(word) {
                    Role::Clause => top.end_segment(),
                    Role::Chained => top.chained += 1,
                    Role::Operator => top.ops += 1,
                    Role::Other => {}
                }
            }
            Token::Whitespace(_) | Token::Number(..) | Token::Char(_) | Token::Period | Token::Colon
            | Token::DoubleColon | Token::EOF => {}
            t if is_operator(t) => stack.last_mut().expect("nonempty").ops += 1,
            _ => {}
        }
    }
    // Unclosed groups are a syntax error the parser reports; count them as closed.
    let mut depth = 0;
    while let Some(group) = stack.pop() {
        let inner = depth;
        let mut group = group;
        group.child = group.child.max(inner);
        depth = group.depth();
    }
    depth
}

enum Role {
    /// Starts a new clause: a sibling of what came before, not nested in it.
    Clause,
    /// Nests everything of its group (UNION/INTERSECT/EXCEPT, JOIN).
    Chained,
    /// A keyword operator (AND, OR, NOT, LIKE, IS, BETWEEN, IN, CASE, …).
    Operator,
    Other,
}

fn word_role(word: &Word) -> Role {
    if word.quote_style.is_some() {
        return Role::Other;
    }
    let w = word.value.to_ascii_uppercase();
    match w.as_str() {
        "SELECT" | "FROM" | "WHERE" | "GROUP" | "HAVING" | "ORDER" | "LIMIT" | "OFFSET" | "WINDOW" | "QUALIFY"
        | "EMIT" | "VALUES" | "WITH" => Role::Clause,
        "UNION" | "INTERSECT" | "EXCEPT" | "MINUS" | "JOIN" => Role::Chained,
        "AND" | "OR" | "XOR" | "NOT" | "LIKE" | "ILIKE" | "SIMILAR" | "IS" | "BETWEEN" | "IN" | "CASE" | "OVERLAPS"
        | "COLLATE" | "AT" | "RLIKE" | "REGEXP" | "DIV" | "ESCAPE" => Role::Operator,
        _ => Role::Other,
    }
}

fn is_operator(token: &Token) -> bool {
    matches!(
        token,
        Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod
            | Token::StringConcat
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Spaceship
            | Token::Ampersand
            | Token::Pipe
            | Token::Caret
            | Token::ShiftLeft
            | Token::ShiftRight
            | Token::Tilde
            | Token::TildeAsterisk
            | Token::ExclamationMarkTilde
            | Token::ExclamationMarkTildeAsterisk
            | Token::DoubleTilde
            | Token::DoubleTildeAsterisk
            | Token::ExclamationMarkDoubleTilde
            | Token::ExclamationMarkDoubleTildeAsterisk
            | Token::Arrow
            | Token::LongArrow
            | Token::HashArrow
            | Token::HashLongArrow
            | Token::AtArrow
            | Token::ArrowAt
            | Token::Sharp
            | Token::ExclamationMark
            | Token::DoubleExclamationMark
            | Token::AtSign
            | Token::Question
            | Token::QuestionAnd
            | Token::QuestionPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::tokenize;

    fn bound(sql: &str) -> usize {
        nesting_bound(&tokenize(sql).unwrap())
    }

    #[test]
    fn a_chain_of_operators_nests_as_deep_as_it_is_long() {
        let chain = vec!["a"; 300].join(" + ");
        assert_eq!(bound(&format!("SELECT {chain} FROM t")), 300);
        let ors = (0..2000).map(|i| format!("a = {i}")).collect::<Vec<_>>().join(" OR ");
        assert!(bound(&format!("SELECT a FROM t WHERE {ors}")) >= 2000);
        let unions = vec!["SELECT a FROM t"; 2000].join(" UNION ALL ");
        assert!(bound(&unions) >= 2000);
    }

    #[test]
    fn siblings_do_not_add_up() {
        let columns = (0..3000).map(|i| format!("a + {i}")).collect::<Vec<_>>().join(", ");
        assert!(bound(&format!("SELECT {columns} FROM t")) < 10);
        let list = (0..5000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        assert!(bound(&format!("SELECT a FROM t WHERE a IN ({list})")) < 10);
        // Clauses are siblings too.
        assert!(bound("SELECT a + 1 FROM t WHERE b = 2 AND c = 3 GROUP BY a HAVING COUNT(*) > 1") < 10);
    }

    #[test]
    fn groups_add_a_level_each() {
        let nested = format!("SELECT {}1{} FROM t", "abs(".repeat(30), ")".repeat(30));
        assert_eq!(bound(&nested), 31);
        // Strings and quoted names are never operators.
        assert!(bound("SELECT 'a + b + c + d' AS \"AND\" FROM t") < 3);
    }

    #[test]
    fn long_chains_of_names_are_refused_before_the_parser_backtracks_through_them() {
        let chain = |n: usize| format!("SELECT t . {} . . ts ts FROM t", vec!["ts"; n].join(" . "));
        check_depth(&tokenize(&chain(10)).unwrap()).unwrap();
        let err = check_depth(&tokenize(&chain(40)).unwrap()).unwrap_err();
        assert!(err.message.contains("chains more than 12 names"), "{}", err.message);
        // Separate names, however many, are not one chain.
        check_depth(&tokenize(&format!("SELECT {} FROM t", vec!["a.b.c"; 100].join(", "))).unwrap()).unwrap();
    }

    #[test]
    fn deep_statements_are_refused_with_a_parse_error() {
        let ors = (0..2000).map(|i| format!("a = {i}")).collect::<Vec<_>>().join(" OR ");
        let err = check_depth(&tokenize(&format!("SELECT a FROM t WHERE {ors}")).unwrap()).unwrap_err();
        assert_eq!(err.code, laminardb_engine::ErrorCode::SqlParseError);
        assert!(err.message.contains("nests too deeply"), "{}", err.message);
        check_depth(&tokenize(&format!("SELECT {} FROM t", vec!["a"; 300].join(" + "))).unwrap()).unwrap();
    }

    #[test]
    fn nested_groups_and_nested_casts_are_capped() {
        let check = |sql: String| check_depth(&tokenize(&sql).unwrap());
        check(format!("SELECT {}1{} FROM t", "(".repeat(32), ")".repeat(32))).unwrap();
        assert!(check(format!("SELECT {}1{} FROM t", "(".repeat(33), ")".repeat(33))).is_err());
        check(format!("SELECT {}a{} FROM t", "CAST(".repeat(10), " AS INT)".repeat(10))).unwrap();
        let err = check(format!("SELECT {}a FROM t", "cast (".repeat(11))).unwrap_err();
        assert!(err.message.contains("CAST"), "{}", err.message);
        // Parentheses inside a CAST that are not calls do not count as CASTs.
        check(format!("SELECT CAST({}a{} AS INT) FROM t", "(".repeat(20), ")".repeat(20))).unwrap();
    }

    #[test]
    fn unbalanced_parentheses_do_not_panic() {
        assert!(bound(")))") >= 1);
        assert!(bound("((((") >= 4);
    }

    /// A random expression: chains of binary operators, unary operators, function calls,
    /// CASE, IN lists, BETWEEN and parentheses, nested up to `depth` groups.
    fn next(rng: &mut u64, n: u64) -> u64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % n
    }

    fn expr(rng: &mut u64, depth: u32, out: &mut String) {
        let long = next(rng, 4) == 0;
        let links = 1 + next(rng, if long { 300 } else { 4 });
        for i in 0..links {
            // Deep and long at once would grow without bound: past a size, only leaves.
            let depth = if out.len() > 4_000 { 0 } else { depth };
            if i > 0 {
                out.push_str([" + ", " * ", " OR ", " AND ", " = ", " < ", " || ", " - "][next(rng, 8) as usize]);
            }
            // Each kind but a leaf (0) and CASE (4) wraps one subexpression.
            const WRAPS: [(&str, &str); 8] =
                [("", ""), ("(", ")"), ("abs(", ")"), ("NOT ", ""), ("", ""), ("a IN (1, 2, ", ")"), ("a BETWEEN 1 AND ", ""), ("-", "")];
            match if depth == 0 { 0 } else { next(rng, 8) } {
                0 => out.push_str(["a", "1", "'s'", "2.5", "NULL", "b"][next(rng, 6) as usize]),
                4 => {
                    out.push_str("CASE WHEN ");
                    expr(rng, depth - 1, out);
                    out.push_str(" THEN ");
                    expr(rng, depth - 1, out);
                    out.push_str(" ELSE 0 END");
                }
                kind => {
                    let (open, close) = WRAPS[kind as usize];
                    out.push_str(open);
                    expr(rng, depth - 1, out);
                    out.push_str(close);
                }
            }
        }
    }

    struct Depth {
        now: usize,
        max: usize,
    }

    impl datafusion::sql::sqlparser::ast::Visitor for Depth {
        type Break = ();
        fn pre_visit_expr(&mut self, _: &datafusion::sql::sqlparser::ast::Expr) -> std::ops::ControlFlow<()> {
            self.now += 1;
            self.max = self.max.max(self.now);
            std::ops::ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, _: &datafusion::sql::sqlparser::ast::Expr) -> std::ops::ControlFlow<()> {
            self.now -= 1;
            std::ops::ControlFlow::Continue(())
        }
    }

    /// The bound is sound: for random expressions sqlparser parses, the parsed tree is
    /// never deeper than what the tokens promised.
    #[test]
    fn the_bound_is_never_below_the_parsed_depth() {
        use datafusion::sql::sqlparser::ast::Visit;
        use datafusion::sql::sqlparser::dialect::GenericDialect;
        use datafusion::sql::sqlparser::parser::Parser;
        let run = || {
            let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
            let mut checked = 0;
            for case in 0..200 {
                let mut e = String::new();
                expr(&mut rng, 6, &mut e);
                let sql = format!("SELECT {e} FROM t WHERE {e}");
                let Ok(statements) = Parser::new(&GenericDialect {}).try_with_sql(&sql).and_then(|mut p| p.parse_statements())
                else {
                    continue;
                };
                let mut depth = Depth { now: 0, max: 0 };
                let _ = statements.visit(&mut depth);
                assert!(bound(&sql) >= depth.max, "case {case}: bound {} < parsed depth {} for {sql}", bound(&sql), depth.max);
                checked += 1;
            }
            assert!(checked > 150, "only {checked} cases parsed");
        };
        std::thread::Builder::new().stack_size(256 << 20).spawn(run).unwrap().join().unwrap();
    }
}
