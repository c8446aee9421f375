//! The client side of the wire: the upgrade request, the `101` head, unmasked server frames and
//! masked client frames. It parses only what the load tester measures.

/// The fixed `Sec-WebSocket-Key` every load-test client sends (the server's answer is checked).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` that answers [`KEY`] (RFC 6455's own example).
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A `GET /v1/stream` upgrade request, offering `permessage-deflate` as a browser does when
/// `deflate`.
pub fn upgrade_request(host: &str, token: &str, workspace: &str, deflate: bool) -> Vec<u8> {
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    format!(
        "GET /v1/stream?token={token}&workspace={workspace} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// Inflates a compressed message (`permessage-deflate`, each message standing alone) into
/// `out`; false if it is not valid.
pub fn inflate(d: &mut flate2::Decompress, body: &[u8], out: &mut Vec<u8>) -> bool {
    d.reset(false);
    out.clear();
    let mut input = Vec::with_capacity(body.len() + 4);
    input.extend_from_slice(body);
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut rest: &[u8] = &input;
    loop {
        out.reserve(body.len() * 4 + 256);
        let before = d.total_in();
        if d.decompress_vec(rest, out, flate2::FlushDecompress::Sync)
            .is_err()
        {
            return false;
        }
        rest = &rest[(d.total_in() - before) as usize..];
        if rest.is_empty() && out.len() < out.capacity() {
            return true;
        }
    }
}

/// Finds a complete response head; returns (status, head length).
pub fn response_head(buf: &[u8]) -> Option<(u16, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let line_end = buf.iter().position(|&b| b == b'\r')?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    Some((status, end))
}

/// A server frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A text frame's payload.
    Text(&'a [u8]),
    /// A compressed text frame's payload (RSV1, `permessage-deflate`).
    Compressed(&'a [u8]),
    /// A close frame's code (1005 when it has none).
    Close(u16),
    /// A ping's payload.
    Ping(&'a [u8]),
    /// Anything else (pong, binary, continuation).
    Other,
}

/// Parses one frame from the start of `buf`; `None` until it is complete. Server frames are
/// never masked; a masked one is reported as `Other` after skipping its mask.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame<'_>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let masked = buf[1] & 0x80 != 0;
    let (len, mut off): (usize, usize) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if masked {
        off += 4;
    }
    let end = off.checked_add(len)?;
    if buf.len() < end {
        return None;
    }
    let payload = &buf[off..end];
    let frame = match buf[0] & 0x0f {
        _ if masked => Frame::Other,
        0x1 if buf[0] & 0x40 != 0 => Frame::Compressed(payload),
        0x1 => Frame::Text(payload),
        0x8 => Frame::Close(if payload.len() >= 2 {
            u16::from_be_bytes([payload[0], payload[1]])
        } else {
            1005
        }),
        0x9 => Frame::Ping(payload),
        _ => Frame::Other,
    };
    Some((frame, end))
}

/// A masked client frame (the mask is fixed: the load tester measures the server, not masking).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x80 | opcode];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

/// Reads an unsigned integer that follows `key` (e.g. `"seq":`) in `json`.
pub fn number_after(json: &[u8], key: &[u8]) -> Option<u64> {
    let at = json.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = json[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    std::str::from_utf8(&json[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_compressed_frame_is_told_apart_and_inflates_to_the_server_s_text() {
        // The server's own compressor, as it compresses an event frame once for everyone.
        let text = br#"{"type":"t","payload":{"seq":7,"pad":"pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp"},"ts":"2026-12-05T00:00:00.000Z"}"#;
        let plain =
            causeloop_stream::ws::frame::encode(causeloop_stream::ws::frame::OpCode::Text, text);
        let frame = causeloop_stream::ws::deflate::Deflater::default()
            .compress_frame(&plain, 1)
            .expect("compressible");
        let (parsed, used) = parse_frame(&frame).unwrap();
        assert_eq!(used, frame.len());
        let Frame::Compressed(body) = parsed else {
            panic!("{parsed:?}")
        };
        let (mut d, mut out) = (flate2::Decompress::new(false), Vec::new());
        assert!(inflate(&mut d, body, &mut out));
        assert_eq!(out, text);
        // Twice with the same inflater: each message stands alone.
        assert!(inflate(&mut d, body, &mut out));
        assert_eq!(out, text);
        assert!(!inflate(&mut d, &[0xff, 0xfe, 0x00], &mut out));
        assert!(upgrade_request("h", "t", "w", true)
            .windows(24)
            .any(|w| w == b"Sec-WebSocket-Extensions"));
        assert!(!upgrade_request("h", "t", "w", false)
            .windows(24)
            .any(|w| w == b"Sec-WebSocket-Extensions"));
    }
    use super::*;

    #[test]
    fn frames_and_heads() {
        assert_eq!(
            response_head(b"HTTP/1.1 101 Switching\r\nA: b\r\n\r\nrest"),
            Some((101, 32))
        );
        assert_eq!(response_head(b"HTTP/1.1 101 Switching\r\n"), None);
        let mut f = vec![0x81, 3];
        f.extend_from_slice(b"abc");
        f.extend_from_slice(&[0x88, 2, 0x03, 0xf0]);
        let (a, n) = parse_frame(&f).unwrap();
        assert_eq!(a, Frame::Text(b"abc"));
        assert_eq!(parse_frame(&f[n..]).unwrap().0, Frame::Close(1008));
        assert_eq!(parse_frame(&f[..4]), None);
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(parse_frame(&long).unwrap().1, 260);
    }

    #[test]
    fn numbers() {
        let j =
            br#"{"type":"loadtest.event","payload":{"seq":42,"t":1700000000123456789},"ts":"x"}"#;
        assert_eq!(number_after(j, b"\"seq\":"), Some(42));
        assert_eq!(number_after(j, b"\"t\":"), Some(1_700_000_000_123_456_789));
        assert_eq!(number_after(j, b"\"nope\":"), None);
    }
}
