#![no_main]
//! See `causeloop_stream::fuzzing::ws_deflate` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::ws_deflate(data));
