#![no_main]
//! See `causeloop_stream::fuzzing::cluster_layout` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::cluster_layout(data));
