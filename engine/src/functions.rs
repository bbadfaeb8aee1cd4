//! Scalar functions the user registers from Python (`Connection.register_udf`), as
//! DataFusion UDFs. The registry is shared by every version of a database's catalog
//! (`Catalog::functions`), so the planner finds them wherever it plans SQL: ad-hoc
//! queries, streams, subscriptions. Functions are not stored: a database with storage
//! refuses a stream that calls one (`StreamPlan::functions`), since it could not be planned
//! again when the database reopens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::logical_expr::ScalarUDF;
use parking_lot::RwLock;

#[derive(Debug, Default)]
pub struct Functions {
    by_name: RwLock<BTreeMap<String, Arc<ScalarUDF>>>,
    /// Bumped on every registration, so a planner knows when to add them again.
    version: AtomicU64,
}

impl Functions {
    /// Adds `function` under its name, replacing one of that name (streams already
    /// planned keep calling the one they were planned with).
    pub fn register(&self, function: ScalarUDF) {
        self.by_name.write().insert(function.name().to_string(), Arc::new(function));
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn all(&self) -> Vec<Arc<ScalarUDF>> {
        self.by_name.read().values().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.read().contains_key(name)
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}
