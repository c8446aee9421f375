#![no_main]
//! See `causeloop_stream::fuzzing::wire_message` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::wire_message(data));
