//! # laminardb-engine: the shared vocabulary of the engine
//!
//! Every other crate speaks in these types: error codes ([`error`]), the catalog of
//! sources and their schemas ([`catalog`]), engine configuration ([`config`]), SQL/Arrow
//! type names ([`types`]), hash partitioning of rows onto shards ([`partition`]) and the
//! two seams that keep the planner and the shard runtime independent of each other
//! ([`frontend`]): the runtime calls the SQL front end through [`frontend::Frontend`], and
//! the front end reads shard-resident data through [`frontend::ShardAccess`]. The dataflow
//! core ([`dataflow`]: the operator trait, DAGs of operator specs, watermarks, barrier
//! alignment) and the operators themselves ([`stream`]) live here too, so that the
//! planner builds DAGs and the shards run them without knowing each other.
//!
//! This crate has no glommio and no PyO3: it must stay usable from any thread and in any
//! test without a reactor or an interpreter.

pub mod alloc;
pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod dataflow;
pub mod error;
pub mod frontend;
pub mod functions;
pub mod ingest;
pub mod ipc;
pub mod lookup;
pub mod nexmark;
pub mod partition;
pub mod recovery;
#[cfg(test)]
mod sim;
pub mod sink;
pub mod source;
pub mod stream;
pub mod types;
pub mod vfs;
pub mod wal;

pub use error::{Error, ErrorCode, Result};
