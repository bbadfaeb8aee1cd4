//! # laminardb-shards: the thread-per-core runtime
//!
//! ```text
//!  Python threads                 coordinator thread                shard threads (pinned)
//!  ──────────────                 ──────────────────                ──────────────────────
//!  Handle::call ──bounded queue──▶ Coordinator (glommio, unpinned) ─shared_channel─▶ Shard 0
//!       ▲                          owns Catalog + Frontend          ─shared_channel─▶ Shard 1
//!       └────── reply (oneshot) ◀──────────────────────────────────── acks / scans ──┘
//! ```
//!
//! * [`Handle`] is what the Python layer holds: it sends [`command::Command`]s to the
//!   coordinator and waits for the reply (the caller releases the GIL first).
//! * The coordinator owns the catalog and the SQL front end, and is the only thread that
//!   sends to shards. Shard replies that a caller waits for go straight back to the caller.
//! * Each shard is a glommio executor pinned to one core that owns its partition of every
//!   source ([`store::LocalStore`]); nothing in a shard is shared with another thread.
//! * With a storage directory (`storage`), each shard writes its rows to its own WAL
//!   (`wal`, glommio direct I/O) before applying them, the coordinator logs catalog changes
//!   and watermark calls, takes checkpoints, and at open restores the latest checkpoint and
//!   replays the WAL tail (see ARCHITECTURE.md, "Durability").

pub mod command;
mod coordinator;
mod handle;
mod health;
pub mod runtime;
mod shard;
mod storage;
mod tempdirs;
pub mod store;
mod wal;

pub use handle::{CheckpointStats, Handle, Outcome, PreparedInsert, SentInsert};
pub use health::Health;
