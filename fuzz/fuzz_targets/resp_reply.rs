#![no_main]
//! See `causeloop_stream::fuzzing::resp_reply` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::resp_reply(data));
