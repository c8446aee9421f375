#![no_main]
//! See `causeloop_stream::fuzzing::tls_edge` for what is checked. The handshake uses the fixture
//! certificate in `tests/fixtures/tls/`.
use causeloop_stream::fuzzing::{tls_edge, TlsFixture};
use std::sync::OnceLock;

static FIXTURE: OnceLock<TlsFixture> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let fixture = FIXTURE.get_or_init(|| {
        TlsFixture::new(
            include_bytes!("../../tests/fixtures/tls/cert.pem"),
            include_bytes!("../../tests/fixtures/tls/key.pem"),
            include_bytes!("../../tests/fixtures/tls/ca.pem"),
        )
    });
    tls_edge(fixture, data)
});
