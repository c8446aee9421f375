#![no_main]
//! See `causeloop_stream::fuzzing::client_frames` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::client_frames(data));
