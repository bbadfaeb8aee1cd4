//! Panic bookkeeping shared by every thread of one database.
//!
//! A panic caught while handling a command fails that command with `Internal` (900); a
//! thread that dies records itself here and every later call fails with 900 too.

use parking_lot::Mutex;

use laminardb_engine::Error;

#[derive(Default)]
pub struct Health {
    dead: Mutex<Option<String>>,
}

impl Health {
    pub fn thread_died(&self, thread: &str, why: String) {
        let mut dead = self.dead.lock();
        if dead.is_none() {
            *dead = Some(format!("{thread} stopped: {why}"));
        }
    }

    pub fn check(&self) -> Result<(), Error> {
        match &*self.dead.lock() {
            Some(why) => Err(Error::internal(why.clone())),
            None => Ok(()),
        }
    }
}

/// Runs `f`, turning a panic into an `Internal` error that names `place`.
pub fn catch<T>(place: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(Error::internal(format!(
            "panic in {place}: {}",
            laminardb_engine::error::panic_message(&*payload)
        ))),
    }
}
