//! The `101 Switching Protocols` response that completes a WebSocket upgrade.

/// Builds the upgrade response for a validated `Sec-WebSocket-Key`.
///
/// The accept value is derived by tungstenite (SHA-1 of the key and the RFC 6455 GUID, base64).
pub fn response(sec_websocket_key: &[u8]) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(sec_websocket_key);
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc_6455_example_key() {
        let r = super::response(b"dGhlIHNhbXBsZSBub25jZQ==");
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(s.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }
}
