//! Functions the user registers from Python: scalar functions (`Connection.register_udf`)
//! as DataFusion UDFs, and aggregate functions (`Connection.register_udaf`) as
//! [`UserAggregate`]s. The registry is shared by every version of a database's catalog
//! (`Catalog::functions`), so the planner finds them wherever it plans SQL: ad-hoc
//! queries, streams, subscriptions. The engine keeps no Python: a database with storage
//! takes a stream calling a function only if the binding stored how to import it again
//! (`mark_stored`; `laminardb._udf` keeps a `FUNCTIONS` file in the storage directory and
//! imports them before recovery, `EngineConfig::functions`); otherwise the stream could
//! not be planned again when the database reopens, and is refused
//! (`StreamPlan::functions`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::FieldRef;
use datafusion::logical_expr::{Accumulator, AggregateUDF, ScalarUDF};
use parking_lot::RwLock;

use crate::error::Result;

/// An aggregate function the user wrote: DataFusion's view of it for ad-hoc queries
/// (`udaf`), and what a stream's aggregate keeps per group (`stream::user_agg`): one
/// accumulator each, whose state (`state_fields`) goes into checkpoints as Arrow.
pub trait UserAggregate: Send + Sync + std::fmt::Debug {
    fn udaf(&self) -> Arc<AggregateUDF>;
    /// A fresh accumulator: one group's state before any row.
    fn accumulator(&self) -> Result<Box<dyn Accumulator>>;
    /// The fields of `Accumulator::state`, in its order, for arguments of `args`' types.
    fn state_fields(&self, args: &[arrow::datatypes::DataType]) -> Vec<FieldRef>;
    /// Its state is the group's rows themselves (a Python scalar function called over a
    /// group, `planner::group_call`): a stream takes it only over a window.
    fn keeps_rows(&self) -> bool {
        false
    }
    /// An accumulator holding exactly the state in row `row` of `states` (one array per
    /// state field), as `Accumulator::state` gave it.
    fn restore(&self, states: &[ArrayRef], row: usize) -> Result<Box<dyn Accumulator>>;
}

#[derive(Debug, Default)]
pub struct Functions {
    by_name: RwLock<BTreeMap<String, Arc<ScalarUDF>>>,
    aggregates: RwLock<BTreeMap<String, Arc<dyn UserAggregate>>>,
    /// Functions a reopened database imports again (see the module's doc).
    stored: RwLock<std::collections::BTreeSet<String>>,
    /// Bumped on every registration, so a planner knows when to add them again.
    version: AtomicU64,
}

impl Functions {
    /// Adds `function` under its name, replacing a function of that name (streams
    /// already planned keep calling the one they were planned with).
    pub fn register(&self, function: ScalarUDF) {
        let name = function.name().to_string();
        self.aggregates.write().remove(&name);
        self.stored.write().remove(&name);
        self.by_name.write().insert(name, Arc::new(function));
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Adds an aggregate function under `name`, replacing a function of that name.
    pub fn register_aggregate(&self, name: &str, function: Arc<dyn UserAggregate>) {
        self.by_name.write().remove(name);
        self.stored.write().remove(name);
        self.aggregates.write().insert(name.to_string(), function);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Forgets the aggregate `name`, if there is one.
    pub fn remove_aggregate(&self, name: &str) {
        if self.aggregates.write().remove(name).is_some() {
            self.stored.write().remove(name);
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    pub fn all(&self) -> Vec<Arc<ScalarUDF>> {
        self.by_name.read().values().cloned().collect()
    }

    pub fn all_aggregates(&self) -> Vec<Arc<dyn UserAggregate>> {
        self.aggregates.read().values().cloned().collect()
    }

    pub fn all_aggregate_names(&self) -> Vec<String> {
        self.aggregates.read().keys().cloned().collect()
    }

    pub fn aggregate(&self, name: &str) -> Option<Arc<dyn UserAggregate>> {
        self.aggregates.read().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.read().contains_key(name) || self.aggregates.read().contains_key(name)
    }

    /// The function `name` will be there again when the database reopens.
    pub fn mark_stored(&self, name: &str) {
        self.stored.write().insert(name.to_string());
    }

    pub fn is_stored(&self, name: &str) -> bool {
        self.stored.read().contains(name)
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}
