#![no_main]
//! See `causeloop_stream::fuzzing::ack_pong` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::ack_pong(data));
