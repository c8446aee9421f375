#![no_main]
//! See `causeloop_stream::fuzzing::publish_body` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::publish_body(data));
