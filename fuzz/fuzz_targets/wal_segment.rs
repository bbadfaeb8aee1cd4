//! The WAL segment decoder and the tests recovery runs on a damaged tail never panic,
//! whatever the bytes: `cargo fuzz run wal_segment` (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    laminardb_engine::wal::fuzz_segment(bytes);
});
