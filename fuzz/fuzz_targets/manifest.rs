//! The checkpoint manifest parser never panics, whatever the bytes:
//! `cargo fuzz run manifest` (see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = laminardb_engine::checkpoint::parse_manifest(bytes);
});
