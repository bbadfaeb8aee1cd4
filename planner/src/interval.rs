//! Durations written in SQL (`INTERVAL '5' SECOND`, `INTERVAL '1 minute'`, or a bare
//! number of milliseconds) as milliseconds.

use arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;
use datafusion::sql::sqlparser::ast::{Expr, Interval, Value};

use laminardb_engine::{Error, Result};

pub fn interval_ms(expr: &Expr) -> Result<i64> {
    match expr {
        Expr::Interval(interval) => interval_literal_ms(interval),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse::<i64>().map_err(|_| bad(expr)),
            _ => Err(bad(expr)),
        },
        Expr::Nested(inner) => interval_ms(inner),
        _ => Err(bad(expr)),
    }
}

fn interval_literal_ms(interval: &Interval) -> Result<i64> {
    if interval.last_field.is_some() {
        return Err(Error::unsupported(format!("interval ranges such as {interval}")));
    }
    let text = match interval.value.as_ref() {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::Number(s, _) => s.clone(),
            _ => return Err(bad_interval(interval)),
        },
        _ => return Err(bad_interval(interval)),
    };
    let text = match &interval.leading_field {
        Some(unit) => format!("{text} {unit}"),
        None => text,
    };
    let value = parse_interval_month_day_nano(&text).map_err(|e| Error::parse(format!("{interval}: {e}")))?;
    if value.months != 0 {
        return Err(Error::unsupported(format!("{interval}: months and years have no fixed length")));
    }
    Ok(value.days as i64 * 86_400_000 + value.nanoseconds / 1_000_000)
}

fn bad(expr: &Expr) -> Error {
    Error::parse(format!("expected an INTERVAL or a number of milliseconds, found {expr}"))
}

fn bad_interval(interval: &Interval) -> Error {
    Error::parse(format!("cannot read the interval {interval}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn ms(sql: &str) -> Result<i64> {
        let expr = Parser::new(&GenericDialect {}).try_with_sql(sql).unwrap().parse_expr().unwrap();
        interval_ms(&expr)
    }

    #[test]
    fn spellings() {
        assert_eq!(ms("INTERVAL '5' SECOND").unwrap(), 5_000);
        assert_eq!(ms("INTERVAL '1 minute'").unwrap(), 60_000);
        assert_eq!(ms("INTERVAL '1.5' SECOND").unwrap(), 1_500);
        assert_eq!(ms("INTERVAL '2' HOUR").unwrap(), 7_200_000);
        assert_eq!(ms("250").unwrap(), 250);
        assert!(ms("INTERVAL '1' MONTH").is_err());
    }
}
