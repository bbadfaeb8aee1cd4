//! Vectorized per-group aggregate state: one column of state per aggregate, indexed by
//! group id, updated by tight loops over Arrow arrays (no boxed accumulator per group).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};

use parking_lot::Mutex;

use super::user_agg::UserAcc;
use super::{AggCall, AggKind, Domain};
use crate::error::{Error, Result};

/// An argument column converted to its aggregate's domain.
pub enum Values {
    Int(Int64Array),
    Float(Float64Array),
    Str(StringArray),
    /// `COUNT(*)`: every row counts.
    Star,
    /// A user aggregate's arguments, as they are.
    Columns(Vec<ArrayRef>),
}

impl Values {
    pub fn of(array: Option<&ArrayRef>, domain: Domain) -> Result<Values> {
        let Some(array) = array else { return Ok(Values::Star) };
        let array = match array.data_type() {
            DataType::Boolean => cast(&cast(array, &DataType::Int8)?, &DataType::Int64)?,
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 | DataType::Time32(_) | DataType::Time64(_) | DataType::Duration(_)
                if domain == Domain::Int =>
            {
                arrow::compute::kernels::cast::cast_with_options(array, &DataType::Int64, &Default::default())
                    .or_else(|_| cast(&cast(array, &DataType::Int32)?, &DataType::Int64))?
            }
            _ => cast(array, &domain.data_type())?,
        };
        Ok(match domain {
            Domain::Int => Values::Int(array.as_primitive::<Int64Type>().clone()),
            Domain::Float => Values::Float(array.as_primitive::<Float64Type>().clone()),
            Domain::Str => Values::Str(array.as_string::<i32>().clone()),
        })
    }

    fn is_valid(&self, row: usize) -> bool {
        match self {
            Values::Int(a) => a.is_valid(row),
            Values::Float(a) => a.is_valid(row),
            Values::Str(a) => a.is_valid(row),
            Values::Star | Values::Columns(_) => true,
        }
    }

    fn float(&self, row: usize) -> f64 {
        match self {
            Values::Int(a) => a.value(row) as f64,
            Values::Float(a) => a.value(row),
            _ => f64::NAN,
        }
    }

    fn scalar(&self, row: usize) -> Scalar {
        if !self.is_valid(row) {
            return Scalar::Null;
        }
        match self {
            Values::Int(a) => Scalar::Int(a.value(row)),
            Values::Float(a) => Scalar::Float(a.value(row)),
            Values::Str(a) => Scalar::Str(a.value(row).into()),
            Values::Star | Values::Columns(_) => Scalar::Int(1),
        }
    }
}

/// Calls `f(group, value)` for every pair `(rows[i], groups[i])` whose input value is not
/// null, the value read as `f64`. The array's type and whether it has nulls are looked at
/// once per batch instead of once per row (`Acc::update` with a per-row `match` in
/// `is_valid` and `float` led the OHLC workload's profile).
fn each_float(values: &Values, rows: &[u32], groups: &[u32], mut f: impl FnMut(usize, f64)) {
    let pairs = rows.iter().map(|&r| r as usize).zip(groups.iter().map(|&g| g as usize));
    match values {
        Values::Float(a) if a.null_count() == 0 => {
            let v = a.values();
            pairs.for_each(|(r, g)| f(g, v[r]));
        }
        Values::Int(a) if a.null_count() == 0 => {
            let v = a.values();
            pairs.for_each(|(r, g)| f(g, v[r] as f64));
        }
        _ => pairs.filter(|&(r, _)| values.is_valid(r)).for_each(|(r, g)| f(g, values.float(r))),
    }
}

/// One value of a domain, for state that keeps values (MIN/MAX of strings, FIRST/LAST,
/// DISTINCT).
#[derive(Clone, Debug, PartialEq)]
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Scalar {
    Null,
    Int(i64),
    Float(f64),
    Str(Box<str>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(PartialEq, Eq, Hash))]
pub enum DistinctKey {
    Int(i64),
    Float(u64),
    Str(Box<str>),
}

fn distinct_key(s: Scalar) -> Option<DistinctKey> {
    match s {
        Scalar::Null => None,
        Scalar::Int(v) => Some(DistinctKey::Int(v)),
        // DataFusion's COUNT(DISTINCT) tells floats apart by their bits: -0.0 and 0.0 are
        // two values, NaN one.
        Scalar::Float(v) => Some(DistinctKey::Float(v.to_bits())),
        Scalar::Str(v) => Some(DistinctKey::Str(v)),
    }
}

fn scalar_less(a: &Scalar, b: &Scalar) -> bool {
    match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => x < y,
        (Scalar::Float(x), Scalar::Float(y)) => x.total_cmp(y).is_lt(),
        (Scalar::Str(x), Scalar::Str(y)) => x < y,
        _ => false,
    }
}

/// Whether `v` replaces `cur` as the MIN (`min`) or MAX: in IEEE 754's total order, as
/// DataFusion's MIN/MAX kernels compare floats (NaN above every number, -0.0 below 0.0),
/// so the result does not depend on the order rows arrive in.
fn float_better(min: bool, v: f64, cur: f64) -> bool {
    let order = v.total_cmp(&cur);
    if min { order.is_lt() } else { order.is_gt() }
}

/// Adds `sign × a[r]` to `sum[g]` for every `(r, g, sign)` whose value is not null,
/// checked: when a sum would leave the BIGINT range, what this call added is taken back
/// and it fails (DataFusion fails such a SUM ad hoc too; a wrapped sum would be a wrong
/// number).
fn checked_sums(sum: &mut [i64], seen: &mut [bool], a: &Int64Array, triples: impl Iterator<Item = (usize, usize, i64)> + Clone) -> Result<()> {
    let mut newly_seen = Vec::new();
    let mut done = 0usize;
    let mut failed = None;
    for (r, g, s) in triples.clone() {
        if a.is_valid(r) {
            let v = a.value(r);
            match s.checked_mul(v).and_then(|d| sum[g].checked_add(d)) {
                Some(x) => sum[g] = x,
                None => {
                    failed = Some(v);
                    break;
                }
            }
            if !seen[g] {
                seen[g] = true;
                newly_seen.push(g);
            }
        }
        done += 1;
    }
    let Some(v) = failed else { return Ok(()) };
    for (r, g, s) in triples.take(done) {
        if a.is_valid(r) {
            sum[g] = sum[g].wrapping_sub(s.wrapping_mul(a.value(r)));
        }
    }
    for g in newly_seen {
        seen[g] = false;
    }
    Err(Error::query(format!("SUM overflowed the BIGINT range (adding {v}); cast the argument to DOUBLE or DECIMAL to sum larger values")))
}

/// The state of one aggregate over every group (serialized as is into checkpoints).
#[derive(Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Acc {
    Count(Vec<i64>),
    SumInt { sum: Vec<i64>, seen: Vec<bool> },
    SumFloat { sum: Vec<f64>, seen: Vec<bool> },
    Avg { sum: Vec<f64>, count: Vec<i64> },
    MinMaxInt { min: bool, value: Vec<i64>, seen: Vec<bool> },
    MinMaxFloat { min: bool, value: Vec<f64>, seen: Vec<bool> },
    MinMaxStr { min: bool, value: Vec<Scalar> },
    /// FIRST_VALUE / LAST_VALUE by event time; ties keep arrival order.
    FirstLast { first: bool, time: Vec<i64>, value: Vec<Scalar>, seen: Vec<bool> },
    Distinct(Vec<HashSet<DistinctKey>>),
    /// Welford's running moments for STDDEV / VAR.
    Moments { kind: AggKind, n: Vec<f64>, mean: Vec<f64>, m2: Vec<f64> },
    /// A user's function: an accumulator per group. Not in the operator's rkyv state
    /// (`AggOperator::save` writes it apart as Arrow); shared by clones.
    User(#[rkyv(with = rkyv::with::Skip)] Arc<Mutex<UserAcc>>),
}

impl Acc {
    pub fn new(call: &AggCall) -> Result<Acc> {
        let unsupported = || Error::unsupported(format!("{:?} over {:?} values in a stream", call.kind, call.domain));
        Ok(match (call.kind, call.domain) {
            (AggKind::Count, _) => Acc::Count(Vec::new()),
            (AggKind::Sum, Domain::Int) => Acc::SumInt { sum: Vec::new(), seen: Vec::new() },
            (AggKind::Sum, Domain::Float) => Acc::SumFloat { sum: Vec::new(), seen: Vec::new() },
            (AggKind::Avg, Domain::Int | Domain::Float) => Acc::Avg { sum: Vec::new(), count: Vec::new() },
            (AggKind::Min | AggKind::Max, Domain::Int) => {
                Acc::MinMaxInt { min: call.kind == AggKind::Min, value: Vec::new(), seen: Vec::new() }
            }
            (AggKind::Min | AggKind::Max, Domain::Float) => {
                Acc::MinMaxFloat { min: call.kind == AggKind::Min, value: Vec::new(), seen: Vec::new() }
            }
            (AggKind::Min | AggKind::Max, Domain::Str) => Acc::MinMaxStr { min: call.kind == AggKind::Min, value: Vec::new() },
            (AggKind::First | AggKind::Last, _) => {
                Acc::FirstLast { first: call.kind == AggKind::First, time: Vec::new(), value: Vec::new(), seen: Vec::new() }
            }
            (AggKind::CountDistinct, _) => Acc::Distinct(Vec::new()),
            (AggKind::User, _) => match &call.user {
                Some(user) => Acc::User(Arc::new(Mutex::new(UserAcc::new(user)))),
                None => return Err(Error::internal("a user aggregate without its function")),
            },
            (AggKind::StddevSamp | AggKind::StddevPop | AggKind::VarSamp | AggKind::VarPop, Domain::Int | Domain::Float) => {
                Acc::Moments { kind: call.kind, n: Vec::new(), mean: Vec::new(), m2: Vec::new() }
            }
            _ => return Err(unsupported()),
        })
    }

    /// Makes room for group ids below `groups`.
    pub fn resize(&mut self, groups: usize) {
        match self {
            Acc::Count(c) => c.resize(groups, 0),
            Acc::SumInt { sum, seen } => {
                sum.resize(groups, 0);
                seen.resize(groups, false);
            }
            Acc::SumFloat { sum, seen } => {
                sum.resize(groups, 0.0);
                seen.resize(groups, false);
            }
            Acc::Avg { sum, count } => {
                sum.resize(groups, 0.0);
                count.resize(groups, 0);
            }
            Acc::MinMaxInt { value, seen, .. } => {
                value.resize(groups, 0);
                seen.resize(groups, false);
            }
            Acc::MinMaxFloat { value, seen, .. } => {
                value.resize(groups, 0.0);
                seen.resize(groups, false);
            }
            Acc::MinMaxStr { value, .. } => value.resize(groups, Scalar::Null),
            Acc::FirstLast { time, value, seen, .. } => {
                time.resize(groups, 0);
                value.resize(groups, Scalar::Null);
                seen.resize(groups, false);
            }
            Acc::Distinct(sets) => sets.resize_with(groups, HashSet::new),
            Acc::Moments { n, mean, m2, .. } => {
                n.resize(groups, 0.0);
                mean.resize(groups, 0.0);
                m2.resize(groups, 0.0);
            }
            Acc::User(user) => user.lock().resize(groups),
        }
    }

    /// Clears group `g` for reuse.
    pub fn reset(&mut self, g: usize) {
        match self {
            Acc::Count(c) => c[g] = 0,
            Acc::SumInt { sum, seen } => (sum[g], seen[g]) = (0, false),
            Acc::SumFloat { sum, seen } => (sum[g], seen[g]) = (0.0, false),
            Acc::Avg { sum, count } => (sum[g], count[g]) = (0.0, 0),
            Acc::MinMaxInt { seen, .. } | Acc::MinMaxFloat { seen, .. } => seen[g] = false,
            Acc::MinMaxStr { value, .. } => value[g] = Scalar::Null,
            Acc::FirstLast { value, seen, .. } => (value[g], seen[g]) = (Scalar::Null, false),
            Acc::Distinct(sets) => sets[g] = HashSet::new(),
            Acc::Moments { n, mean, m2, .. } => (n[g], mean[g], m2[g]) = (0.0, 0.0, 0.0),
            Acc::User(user) => user.lock().reset(g),
        }
    }

    /// Folds input row `rows[i]` into group `groups[i]`, for every `i`; `times` holds each
    /// input row's event time (or arrival order) for FIRST/LAST. Fails only for a SUM of
    /// integers leaving the BIGINT range, and then leaves the state as it was.
    pub fn update(&mut self, values: &Values, rows: &[u32], groups: &[u32], times: &[i64]) -> Result<()> {
        let pairs = rows.iter().map(|&r| r as usize).zip(groups.iter().map(|&g| g as usize));
        match self {
            Acc::Count(count) => match values {
                Values::Star => groups.iter().for_each(|&g| count[g as usize] += 1),
                _ => {
                    for (r, g) in pairs {
                        count[g] += values.is_valid(r) as i64;
                    }
                }
            },
            Acc::SumInt { sum, seen } => {
                if let Values::Int(a) = values {
                    let signs = std::iter::repeat(1);
                    checked_sums(sum, seen, a, rows.iter().zip(groups).zip(signs).map(|((&r, &g), s)| (r as usize, g as usize, s)))?;
                }
            }
            Acc::SumFloat { sum, seen } => each_float(values, rows, groups, |g, v| {
                sum[g] += v;
                seen[g] = true;
            }),
            Acc::Avg { sum, count } => each_float(values, rows, groups, |g, v| {
                sum[g] += v;
                count[g] += 1;
            }),
            Acc::MinMaxInt { min, value, seen } => {
                if let Values::Int(a) = values {
                    for (r, g) in pairs.filter(|&(r, _)| a.is_valid(r)) {
                        let v = a.value(r);
                        if !seen[g] || (*min && v < value[g]) || (!*min && v > value[g]) {
                            value[g] = v;
                            seen[g] = true;
                        }
                    }
                }
            }
            Acc::MinMaxFloat { min, value, seen } => {
                let min = *min;
                each_float(values, rows, groups, |g, v| {
                    if !seen[g] || float_better(min, v, value[g]) {
                        value[g] = v;
                        seen[g] = true;
                    }
                });
            }
            Acc::MinMaxStr { min, value } => {
                for (r, g) in pairs.filter(|&(r, _)| values.is_valid(r)) {
                    let v = values.scalar(r);
                    let better = match &value[g] {
                        Scalar::Null => true,
                        cur if *min => scalar_less(&v, cur),
                        cur => scalar_less(cur, &v),
                    };
                    if better {
                        value[g] = v;
                    }
                }
            }
            Acc::FirstLast { first, time, value, seen } => {
                // Row `r` (at event time `t`) replaces group `g`'s value: the earliest for
                // FIRST, the latest (ties: the later row) for LAST.
                let mut takes = |r: usize, g: usize| {
                    let t = times[r];
                    let take = !seen[g] || if *first { t < time[g] } else { t >= time[g] };
                    if take {
                        time[g] = t;
                        seen[g] = true;
                    }
                    take
                };
                match values {
                    // Null-free floats: the value is read without the per-row type and null check.
                    Values::Float(a) if a.null_count() == 0 => {
                        let v = a.values();
                        for (r, g) in pairs.filter(|&(r, g)| takes(r, g)) {
                            value[g] = Scalar::Float(v[r]);
                        }
                    }
                    _ => {
                        for (r, g) in pairs.filter(|&(r, g)| takes(r, g)) {
                            value[g] = values.scalar(r);
                        }
                    }
                }
            }
            Acc::Distinct(sets) => {
                for (r, g) in pairs {
                    if let Some(k) = distinct_key(values.scalar(r)) {
                        sets[g].insert(k);
                    }
                }
            }
            Acc::Moments { n, mean, m2, .. } => each_float(values, rows, groups, |g, x| {
                n[g] += 1.0;
                let delta = x - mean[g];
                mean[g] += delta / n[g];
                m2[g] += delta * (x - mean[g]);
            }),
            Acc::User(user) => {
                let Values::Columns(args) = values else { return Err(Error::internal("a user aggregate without its arguments")) };
                user.lock().update(args, rows, groups)?;
            }
        }
        Ok(())
    }

    /// Adds (`signs[r] = 1`) or takes back (`-1`) input row `rows[i]` in group `groups[i]`:
    /// the aggregates that can forget a row (COUNT, SUM, AVG), over a changelog input.
    pub fn update_signed(&mut self, values: &Values, rows: &[u32], groups: &[u32], signs: &[i64]) -> Result<()> {
        let pairs = rows.iter().map(|&r| r as usize).zip(groups.iter().map(|&g| g as usize));
        match self {
            Acc::Count(count) => {
                for (r, g) in pairs {
                    count[g] += signs[r] * values.is_valid(r) as i64;
                }
            }
            Acc::SumInt { sum, seen } => {
                if let Values::Int(a) = values {
                    let triples = rows.iter().zip(groups).map(|(&r, &g)| (r as usize, g as usize, signs[r as usize]));
                    checked_sums(sum, seen, a, triples)?;
                }
            }
            Acc::SumFloat { sum, seen } => {
                for (r, g) in pairs.filter(|&(r, _)| values.is_valid(r)) {
                    sum[g] += signs[r] as f64 * values.float(r);
                    seen[g] = true;
                }
            }
            Acc::Avg { sum, count } => {
                for (r, g) in pairs.filter(|&(r, _)| values.is_valid(r)) {
                    sum[g] += signs[r] as f64 * values.float(r);
                    count[g] += signs[r];
                }
            }
            _ => return Err(Error::internal("an aggregate that cannot take rows back read a changelog")),
        }
        Ok(())
    }

    /// Whether folding group `src` into `dst` would take a SUM of integers out of the
    /// BIGINT range (checked before sessions merge, so that a merge never fails halfway).
    pub fn merge_overflows(&self, dst: usize, src: usize) -> bool {
        matches!(self, Acc::SumInt { sum, .. } if sum[dst].checked_add(sum[src]).is_none())
    }

    /// Takes back what `update` folded in for a SUM of integers (the other aggregates
    /// cannot, and are updated only after every SUM succeeded; see `AggOperator::apply`).
    /// `signs` as given to `update_signed`, if it was that; `seen_before` what
    /// `seen_flags(groups)` said before the update.
    pub fn revert(&mut self, values: &Values, rows: &[u32], groups: &[u32], signs: Option<&[i64]>, seen_before: &[bool]) {
        if let (Acc::SumInt { sum, seen }, Values::Int(a)) = (self, values) {
            for (r, g) in rows.iter().zip(groups).map(|(&r, &g)| (r as usize, g as usize)).filter(|&(r, _)| a.is_valid(r)) {
                let sign = signs.map_or(1, |s| s[r]);
                sum[g] = sum[g].wrapping_sub(sign.wrapping_mul(a.value(r)));
            }
            for (&g, &was) in groups.iter().zip(seen_before) {
                seen[g as usize] = was;
            }
        }
    }

    /// For a SUM of integers, whether each of `groups` has seen a value (for `revert`).
    pub fn seen_flags(&self, groups: &[u32]) -> Vec<bool> {
        match self {
            Acc::SumInt { seen, .. } => groups.iter().map(|&g| seen[g as usize]).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether `update` can fail (and so runs, and is reverted, before the others).
    pub fn fallible(&self) -> bool {
        matches!(self, Acc::SumInt { .. })
    }

    /// Folds group `src` into group `dst` (session windows merging; `merge_overflows`
    /// was checked first). Fails only for a user's function.
    pub fn merge(&mut self, dst: usize, src: usize) -> Result<()> {
        match self {
            Acc::Count(c) => c[dst] += c[src],
            Acc::SumInt { sum, seen } => {
                sum[dst] = sum[dst].wrapping_add(sum[src]);
                seen[dst] |= seen[src];
            }
            Acc::SumFloat { sum, seen } => {
                sum[dst] += sum[src];
                seen[dst] |= seen[src];
            }
            Acc::Avg { sum, count } => {
                sum[dst] += sum[src];
                count[dst] += count[src];
            }
            Acc::MinMaxInt { min, value, seen } => {
                if seen[src] && (!seen[dst] || (*min && value[src] < value[dst]) || (!*min && value[src] > value[dst])) {
                    value[dst] = value[src];
                    seen[dst] = true;
                }
            }
            Acc::MinMaxFloat { min, value, seen } => {
                if seen[src] && (!seen[dst] || float_better(*min, value[src], value[dst])) {
                    value[dst] = value[src];
                    seen[dst] = true;
                }
            }
            Acc::MinMaxStr { min, value } => {
                let s = value[src].clone();
                let better = match (&value[dst], &s) {
                    (_, Scalar::Null) => false,
                    (Scalar::Null, _) => true,
                    (cur, v) if *min => scalar_less(v, cur),
                    (cur, v) => scalar_less(cur, v),
                };
                if better {
                    value[dst] = s;
                }
            }
            Acc::FirstLast { first, time, value, seen } => {
                if seen[src] && (!seen[dst] || if *first { time[src] < time[dst] } else { time[src] >= time[dst] }) {
                    time[dst] = time[src];
                    value[dst] = value[src].clone();
                    seen[dst] = true;
                }
            }
            Acc::Distinct(sets) => {
                let s = std::mem::take(&mut sets[src]);
                sets[dst].extend(s);
            }
            Acc::Moments { n, mean, m2, .. } => {
                let (na, nb) = (n[dst], n[src]);
                if nb == 0.0 {
                    return Ok(());
                }
                let total = na + nb;
                let delta = mean[src] - mean[dst];
                mean[dst] += delta * nb / total;
                m2[dst] += m2[src] + delta * delta * na * nb / total;
                n[dst] = total;
            }
            Acc::User(user) => user.lock().merge(dst, src)?,
        }
        Ok(())
    }

    /// The current results of `groups`, cast to `out_type`.
    pub fn evaluate(&self, groups: &[usize], out_type: &DataType) -> Result<ArrayRef> {
        let array: ArrayRef = match self {
            Acc::Count(c) => Arc::new(Int64Array::from_iter_values(groups.iter().map(|&g| c[g]))),
            Acc::SumInt { sum, seen } => Arc::new(groups.iter().map(|&g| seen[g].then_some(sum[g])).collect::<Int64Array>()),
            Acc::SumFloat { sum, seen } => Arc::new(groups.iter().map(|&g| seen[g].then_some(sum[g])).collect::<Float64Array>()),
            Acc::Avg { sum, count } => {
                Arc::new(groups.iter().map(|&g| (count[g] > 0).then(|| sum[g] / count[g] as f64)).collect::<Float64Array>())
            }
            Acc::MinMaxInt { value, seen, .. } => Arc::new(groups.iter().map(|&g| seen[g].then_some(value[g])).collect::<Int64Array>()),
            Acc::MinMaxFloat { value, seen, .. } => {
                Arc::new(groups.iter().map(|&g| seen[g].then_some(value[g])).collect::<Float64Array>())
            }
            Acc::MinMaxStr { value, .. } => scalars(groups.iter().map(|&g| &value[g]), out_type)?,
            Acc::FirstLast { value, .. } => scalars(groups.iter().map(|&g| &value[g]), out_type)?,
            Acc::Distinct(sets) => Arc::new(Int64Array::from_iter_values(groups.iter().map(|&g| sets[g].len() as i64))),
            Acc::Moments { kind, n, m2, .. } => Arc::new(
                groups
                    .iter()
                    .map(|&g| {
                        let sample = matches!(kind, AggKind::StddevSamp | AggKind::VarSamp);
                        let denom = if sample { n[g] - 1.0 } else { n[g] };
                        if denom <= 0.0 {
                            return None;
                        }
                        let var = m2[g] / denom;
                        Some(if matches!(kind, AggKind::StddevSamp | AggKind::StddevPop) { var.sqrt() } else { var })
                    })
                    .collect::<Float64Array>(),
            ),
            Acc::User(user) => user.lock().evaluate(groups, out_type)?,
        };
        if array.data_type() == out_type {
            return Ok(array);
        }
        Ok(cast(&array, out_type)?)
    }
}

/// Kept values as an array of `out_type`: built in the values' own domain, then cast.
fn scalars<'a>(values: impl Iterator<Item = &'a Scalar>, out_type: &DataType) -> Result<ArrayRef> {
    let values: Vec<&Scalar> = values.collect();
    let domain = values.iter().find_map(|v| match v {
        Scalar::Int(_) => Some(Domain::Int),
        Scalar::Float(_) => Some(Domain::Float),
        Scalar::Str(_) => Some(Domain::Str),
        Scalar::Null => None,
    });
    let array: ArrayRef = match domain {
        None => return Ok(arrow::array::new_null_array(out_type, values.len())),
        Some(Domain::Int) => Arc::new(values.iter().map(|v| if let Scalar::Int(x) = v { Some(*x) } else { None }).collect::<Int64Array>()),
        Some(Domain::Float) => {
            Arc::new(values.iter().map(|v| if let Scalar::Float(x) = v { Some(*x) } else { None }).collect::<Float64Array>())
        }
        Some(Domain::Str) => Arc::new(
            values.iter().map(|v| if let Scalar::Str(x) = v { Some(&**x) } else { None }).collect::<StringArray>(),
        ),
    };
    Ok(cast(&array, out_type)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(kind: AggKind, domain: Domain) -> AggCall {
        AggCall { kind, arg: Some(0), domain, out_type: if domain == Domain::Int { DataType::Int64 } else { DataType::Float64 }, user: None }
    }

    fn run(kind: AggKind, values: Vec<Option<f64>>, groups: Vec<u32>) -> Vec<Option<f64>> {
        let c = call(kind, Domain::Float);
        let mut acc = Acc::new(&c).unwrap();
        acc.resize(2);
        let arr: ArrayRef = Arc::new(Float64Array::from(values.clone()));
        let vals = Values::of(Some(&arr), Domain::Float).unwrap();
        let rows: Vec<u32> = (0..values.len() as u32).collect();
        let times: Vec<i64> = (0..values.len() as i64).collect();
        acc.update(&vals, &rows, &groups, &times).unwrap();
        let out = acc.evaluate(&[0, 1], &DataType::Float64).unwrap();
        out.as_primitive::<Float64Type>().iter().collect()
    }

    #[test]
    fn sums_and_extremes_per_group_ignore_nulls() {
        let v = vec![Some(1.0), Some(5.0), None, Some(3.0)];
        let g = vec![0, 1, 0, 0];
        assert_eq!(run(AggKind::Sum, v.clone(), g.clone()), vec![Some(4.0), Some(5.0)]);
        assert_eq!(run(AggKind::Min, v.clone(), g.clone()), vec![Some(1.0), Some(5.0)]);
        assert_eq!(run(AggKind::Max, v.clone(), g.clone()), vec![Some(3.0), Some(5.0)]);
        assert_eq!(run(AggKind::Avg, v.clone(), g.clone()), vec![Some(2.0), Some(5.0)]);
        assert_eq!(run(AggKind::First, v.clone(), g.clone()), vec![Some(1.0), Some(5.0)]);
        assert_eq!(run(AggKind::Last, v, g), vec![Some(3.0), Some(5.0)]);
    }

    /// Arrays without nulls take the accumulators' fast paths: the same results, over a
    /// subset of the rows, with FIRST/LAST by event time rather than by position.
    #[test]
    fn null_free_input_folds_only_the_given_rows_by_event_time() {
        let arr: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 5.0, 2.0, 3.0, 100.0]));
        let vals = Values::of(Some(&arr), Domain::Float).unwrap();
        // Row 4 is not folded; row 2 is the earliest of group 0, row 0 its latest.
        let (rows, groups, times) = (vec![0, 1, 2, 3], vec![0, 1, 0, 0], vec![30, 0, 10, 20, 0]);
        let fold = |kind| {
            let mut acc = Acc::new(&call(kind, Domain::Float)).unwrap();
            acc.resize(2);
            acc.update(&vals, &rows, &groups, &times).unwrap();
            let out = acc.evaluate(&[0, 1], &DataType::Float64).unwrap();
            out.as_primitive::<Float64Type>().iter().collect::<Vec<_>>()
        };
        assert_eq!(fold(AggKind::Sum), vec![Some(6.0), Some(5.0)]);
        assert_eq!(fold(AggKind::Min), vec![Some(1.0), Some(5.0)]);
        assert_eq!(fold(AggKind::Max), vec![Some(3.0), Some(5.0)]);
        assert_eq!(fold(AggKind::Avg), vec![Some(2.0), Some(5.0)]);
        assert_eq!(fold(AggKind::First), vec![Some(2.0), Some(5.0)]);
        assert_eq!(fold(AggKind::Last), vec![Some(1.0), Some(5.0)]);
        let mut star = Acc::new(&AggCall { kind: AggKind::Count, arg: None, domain: Domain::Int, out_type: DataType::Int64, user: None }).unwrap();
        star.resize(2);
        star.update(&Values::Star, &rows, &groups, &times).unwrap();
        let counts = star.evaluate(&[0, 1], &DataType::Int64).unwrap();
        assert_eq!(counts.as_primitive::<Int64Type>().values().to_vec(), vec![3, 1]);
    }

    #[test]
    fn sample_variance_matches_the_textbook_and_merges() {
        let v = vec![Some(2.0), Some(4.0), Some(4.0), Some(4.0), Some(5.0), Some(5.0), Some(7.0), Some(9.0)];
        let g = vec![0; 8];
        let pop = run(AggKind::VarPop, v.clone(), g.clone())[0].unwrap();
        assert!((pop - 4.0).abs() < 1e-12);
        let sd = run(AggKind::StddevPop, v.clone(), g)[0].unwrap();
        assert!((sd - 2.0).abs() < 1e-12);
        // Split across two groups, then merged: same result.
        let split = vec![0, 1, 0, 1, 0, 1, 0, 1];
        let c = call(AggKind::VarPop, Domain::Float);
        let mut acc = Acc::new(&c).unwrap();
        acc.resize(2);
        let arr: ArrayRef = Arc::new(Float64Array::from(v));
        let vals = Values::of(Some(&arr), Domain::Float).unwrap();
        acc.update(&vals, &(0..8).collect::<Vec<_>>(), &split, &[0; 8]).unwrap();
        acc.merge(0, 1).unwrap();
        let merged = acc.evaluate(&[0], &DataType::Float64).unwrap();
        assert!((merged.as_primitive::<Float64Type>().value(0) - 4.0).abs() < 1e-12);
    }
}
