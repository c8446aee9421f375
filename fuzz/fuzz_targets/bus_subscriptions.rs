#![no_main]
//! See `causeloop_stream::fuzzing::bus_subscriptions` for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| causeloop_stream::fuzzing::bus_subscriptions(data));
