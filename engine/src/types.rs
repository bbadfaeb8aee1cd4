//! Type names: the strings users write in `create_table(name, {"col": "type"})` dicts and in
//! SQL DDL (`BIGINT`, `TIMESTAMP(3)`, `DECIMAL(10,2)`, `INT UNSIGNED`…), both mapped to Arrow
//! by one parser so the two spellings can never disagree.

use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};

use crate::error::{Error, Result};

/// Parses a type name, case-insensitively. Unknown names are `InvalidSchema` (203).
pub fn parse_type_string(raw: &str) -> Result<DataType> {
    let norm = raw.trim().to_ascii_lowercase();
    let norm = norm.split_whitespace().collect::<Vec<_>>().join(" ");
    let (base, args) = split_args(&norm).ok_or_else(|| bad(raw))?;
    let unsigned = base.ends_with(" unsigned");
    let base = base.trim_end_matches(" unsigned").trim();
    let ty = match (base, unsigned) {
        ("bool" | "boolean", false) => DataType::Boolean,
        ("int8" | "i8" | "tinyint", false) => DataType::Int8,
        ("int16" | "i16" | "smallint" | "int2", false) => DataType::Int16,
        ("int32" | "i32" | "int" | "integer" | "int4" | "mediumint", false) => DataType::Int32,
        ("int64" | "i64" | "bigint" | "long", false) => DataType::Int64,
        ("uint8" | "u8", false) | ("tinyint", true) => DataType::UInt8,
        ("uint16" | "u16", false) | ("smallint", true) => DataType::UInt16,
        ("uint32" | "u32", false) | ("int" | "integer" | "mediumint", true) => DataType::UInt32,
        ("uint64" | "u64", false) | ("bigint", true) => DataType::UInt64,
        ("float16" | "f16" | "halffloat", false) => DataType::Float16,
        ("float32" | "f32" | "float" | "real" | "float4", false) => DataType::Float32,
        ("float64" | "f64" | "double" | "double precision" | "float8", false) => DataType::Float64,
        ("string" | "str" | "utf8" | "text" | "varchar" | "char" | "character"
        | "character varying" | "nvarchar" | "string_type", false) => DataType::Utf8,
        ("large_string" | "large_utf8" | "largeutf8", false) => DataType::LargeUtf8,
        ("binary" | "bytes" | "bytea" | "blob" | "varbinary", false) => DataType::Binary,
        ("large_binary", false) => DataType::LargeBinary,
        ("date" | "date32", false) => DataType::Date32,
        ("date64", false) => DataType::Date64,
        ("time" | "time64" | "time without time zone", false) => DataType::Time64(TimeUnit::Microsecond),
        ("timestamp" | "datetime" | "timestamp without time zone", false) => {
            DataType::Timestamp(precision_unit(&args, raw)?, None)
        }
        ("timestamptz" | "timestamp with time zone", false) => {
            DataType::Timestamp(precision_unit(&args, raw)?, Some("UTC".into()))
        }
        ("timestamp_s", false) => DataType::Timestamp(TimeUnit::Second, None),
        ("timestamp_ms", false) => DataType::Timestamp(TimeUnit::Millisecond, None),
        ("timestamp_us", false) => DataType::Timestamp(TimeUnit::Microsecond, None),
        ("timestamp_ns", false) => DataType::Timestamp(TimeUnit::Nanosecond, None),
        ("interval", false) => DataType::Interval(IntervalUnit::MonthDayNano),
        ("decimal" | "numeric" | "dec", false) => {
            let (p, s) = match args.as_slice() {
                [] => (38, 10),
                [p] => (*p, 0),
                [p, s] => (*p, *s),
                _ => return Err(bad(raw)),
            };
            if !(1..=38).contains(&p) || s > p {
                return Err(Error::invalid_schema(format!("DECIMAL({p},{s}) is out of range (precision 1..38)")));
            }
            DataType::Decimal128(p as u8, s as i8)
        }
        _ => return Err(bad(raw)),
    };
    let allows_args = matches!(
        ty,
        DataType::Timestamp(..) | DataType::Decimal128(..) | DataType::Utf8 | DataType::Binary
    );
    if !args.is_empty() && !allows_args {
        return Err(bad(raw));
    }
    Ok(ty)
}

/// The SQL spelling of an Arrow type, used to render DDL for `create_table`.
pub fn sql_type_name(ty: &DataType) -> Result<String> {
    Ok(match ty {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "TINYINT UNSIGNED".into(),
        DataType::UInt16 => "SMALLINT UNSIGNED".into(),
        DataType::UInt32 => "INT UNSIGNED".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::Float16 => "FLOAT16".into(),
        DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Utf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::LargeUtf8 => "LARGE_STRING".into(),
        DataType::Binary | DataType::BinaryView => "BYTEA".into(),
        DataType::LargeBinary => "LARGE_BINARY".into(),
        DataType::Date32 => "DATE".into(),
        DataType::Date64 => "DATE64".into(),
        DataType::Time64(TimeUnit::Microsecond) => "TIME".into(),
        DataType::Timestamp(unit, tz) => {
            let p = match unit {
                TimeUnit::Second => 0,
                TimeUnit::Millisecond => 3,
                TimeUnit::Microsecond => 6,
                TimeUnit::Nanosecond => 9,
            };
            if tz.is_some() { format!("TIMESTAMPTZ({p})") } else { format!("TIMESTAMP({p})") }
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => "INTERVAL".into(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        other => return Err(Error::invalid_schema(format!("column type {other} is not supported"))),
    })
}

/// Whether a column type can be stored in a source.
pub fn is_supported(ty: &DataType) -> bool {
    sql_type_name(ty).is_ok()
}

fn precision_unit(args: &[u32], raw: &str) -> Result<TimeUnit> {
    Ok(match args {
        [] => TimeUnit::Microsecond,
        [0] => TimeUnit::Second,
        [1..=3] => TimeUnit::Millisecond,
        [4..=6] => TimeUnit::Microsecond,
        [7..=9] => TimeUnit::Nanosecond,
        _ => return Err(bad(raw)),
    })
}

/// `"decimal(10, 2)"` → `("decimal", [10, 2])`; also handles a trailing modifier after the
/// parentheses (`"timestamp(3) with time zone"`).
fn split_args(s: &str) -> Option<(String, Vec<u32>)> {
    let Some(open) = s.find('(') else { return Some((s.to_string(), vec![])) };
    let close = s[open..].find(')')? + open;
    let args = s[open + 1..close]
        .split(',')
        .map(|a| a.trim().parse::<u32>().ok())
        .collect::<Option<Vec<_>>>()?;
    let base = format!("{} {}", s[..open].trim(), s[close + 1..].trim());
    Some((base.trim().to_string(), args))
}

fn bad(raw: &str) -> Error {
    Error::invalid_schema(format!("unknown column type '{raw}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dict_and_sql_spellings_agree() {
        let cases = [
            ("int64", DataType::Int64),
            ("BIGINT", DataType::Int64),
            ("INT UNSIGNED", DataType::UInt32),
            ("double precision", DataType::Float64),
            ("f32", DataType::Float32),
            ("TIMESTAMP(3)", DataType::Timestamp(TimeUnit::Millisecond, None)),
            ("timestamp", DataType::Timestamp(TimeUnit::Microsecond, None)),
            ("TIMESTAMP(9) WITH TIME ZONE", DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))),
            ("DECIMAL(10, 2)", DataType::Decimal128(10, 2)),
            ("VARCHAR(20)", DataType::Utf8),
            ("bytes", DataType::Binary),
            ("date", DataType::Date32),
            ("interval", DataType::Interval(IntervalUnit::MonthDayNano)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_type_string(s).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn rendering_parses_back() {
        for s in ["boolean", "uint16", "float16", "decimal(5,1)", "timestamp_ns", "timestamptz", "time", "large_string"] {
            let ty = parse_type_string(s).unwrap();
            assert_eq!(parse_type_string(&sql_type_name(&ty).unwrap()).unwrap(), ty, "{s}");
        }
    }

    #[test]
    fn rejects_nonsense() {
        for s in ["", "intt", "decimal(40,2)", "int(3,4,5)", "bool unsigned", "timestamp(12)"] {
            assert_eq!(parse_type_string(s).unwrap_err().code, crate::ErrorCode::InvalidSchema, "{s}");
        }
    }
}
