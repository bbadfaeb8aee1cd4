//! The stateless operator: filter, then projection, row by row — where rows are, before
//! any exchange. A row an expression fails on is rejected alone (`isolate`); the rest go on.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::isolate::{eval_isolating, Rejected};
use super::MapPlan;
use crate::dataflow::{Collector, Operator, OperatorSpec, TaskInfo};
use crate::Result;

pub struct MapOperator {
    plan: Arc<MapPlan>,
}

impl OperatorSpec for MapPlan {
    fn name(&self) -> &'static str {
        "map"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn build(self: Arc<Self>, _task: TaskInfo) -> Result<Box<dyn Operator>> {
        Ok(Box::new(MapOperator { plan: self }))
    }
}

impl Operator for MapOperator {
    fn process(&mut self, _port: usize, batch: &RecordBatch, _hashes: Option<Vec<u64>>, out: &mut Collector) -> Result<()> {
        let plan = &self.plan;
        match eval_isolating(plan.filter.as_ref(), &plan.exprs, &plan.schema, batch) {
            Ok((rows, rejected)) => {
                out.rejected = rejected;
                if rows.num_rows() > 0 {
                    out.rows.push(rows);
                }
            }
            // Not a row's fault (isolation itself failed): the whole batch is rejected.
            Err(error) => out.rejected = Some(Rejected { rows: (0..batch.num_rows()).collect(), error }),
        }
        Ok(())
    }
}
