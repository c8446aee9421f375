//! The `101 Switching Protocols` response that completes a WebSocket upgrade.
//!
//! Written into the caller's buffer with no allocation of its own: the accept value (SHA-1 of the
//! key and the RFC 6455 GUID, base64) is computed with ring into a stack array. The connection
//! queues it in one buffer with the frame that follows it (`connected`), one allocation for both.

use base64::Engine;

/// The GUID RFC 6455 §1.3 appends to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`.
pub fn accept_key(sec_websocket_key: &[u8]) -> [u8; 28] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(sec_websocket_key);
    ctx.update(GUID);
    let digest = ctx.finish();
    let mut out = [0u8; 28];
    // 20 bytes of SHA-1 are always 28 characters of padded base64.
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(digest.as_ref(), &mut out)
        .unwrap_or(0);
    debug_assert_eq!(n, 28);
    out
}

/// Appends the upgrade response for a validated `Sec-WebSocket-Key` to `out`.
pub fn write_response(out: &mut Vec<u8>, sec_websocket_key: &[u8]) {
    write_response_with(out, sec_websocket_key, false)
}

/// [`write_response`], answering a `permessage-deflate` offer when `deflate`.
pub fn write_response_with(out: &mut Vec<u8>, sec_websocket_key: &[u8], deflate: bool) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(&accept_key(sec_websocket_key));
    out.extend_from_slice(b"\r\n");
    if deflate {
        out.extend_from_slice(super::extensions::RESPONSE_HEADER.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// The length of the response [`write_response`] writes.
pub const RESPONSE_LEN: usize = 129;

/// Builds the upgrade response alone.
pub fn response(sec_websocket_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RESPONSE_LEN);
    write_response(&mut out, sec_websocket_key);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc_6455_example_key() {
        let r = super::response(b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(r.len(), super::RESPONSE_LEN);
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(s.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    #[test]
    fn the_accept_value_matches_tungstenite() {
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "x3JJHMbDL1EzLkh9GBhXDw==",
        ] {
            let ours = super::accept_key(key.as_bytes());
            let theirs = tungstenite::handshake::derive_accept_key(key.as_bytes());
            assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs);
        }
    }
}
