//! Server-to-client frame encoding.
//!
//! A server frame is never masked, so its bytes are the same for every recipient: the whole point
//! of this module is to build a frame exactly once and hand out references to it.

use super::SharedFrame;

/// Largest header a server frame can have: 2 bytes plus an 8-byte extended length.
pub const MAX_HEADER_LEN: usize = 10;

/// Frame opcodes the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// A UTF-8 text message (every event frame).
    Text = 0x1,
    /// Connection close.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong, answering a client's ping.
    Pong = 0xA,
}

/// Writes a final, unmasked frame header for `len` payload bytes into `out`; returns its length.
pub fn encode_header(opcode: OpCode, len: usize, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
    out[0] = 0x80 | opcode as u8;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Length of the header [`encode_header`] writes for `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Length of the header of a server frame already built (unmasked, so 2, 4 or 10 bytes, from
/// its second byte); 0 for fewer than two bytes.
pub fn header_len_of(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7f) {
        None => 0,
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
    }
}

/// Encodes one complete frame into a new shared buffer.
pub fn encode(opcode: OpCode, payload: &[u8]) -> SharedFrame {
    let mut buf = Vec::with_capacity(header_len(payload.len()) + payload.len());
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(opcode, payload.len(), &mut hdr);
    buf.extend_from_slice(&hdr[..n]);
    buf.extend_from_slice(payload);
    SharedFrame::from(buf)
}

/// The server's ping: empty, built once per process and shared by every connection it is sent to.
pub fn ping_frame() -> SharedFrame {
    static PING: std::sync::OnceLock<SharedFrame> = std::sync::OnceLock::new();
    PING.get_or_init(|| encode(OpCode::Ping, &[])).clone()
}

/// Builds a text frame whose payload is produced by `write` in place: the buffer it writes
/// into becomes the shared frame, with no copy. `len_hint` is the payload length when known (it
/// only sizes the allocation, so that the payload is written without a reallocation).
pub fn encode_text_with(len_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> SharedFrame {
    let mut buf = Vec::with_capacity(MAX_HEADER_LEN + len_hint);
    buf.resize(MAX_HEADER_LEN, 0);
    write(&mut buf);
    let len = buf.len() - MAX_HEADER_LEN;
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(OpCode::Text, len, &mut hdr);
    let start = MAX_HEADER_LEN - n;
    buf[start..MAX_HEADER_LEN].copy_from_slice(&hdr[..n]);
    SharedFrame::from_vec_at(buf, start)
}

/// Appends a text frame whose payload `write` produces to `out` (which may already hold other
/// bytes: the 101 response, say). The payload is written once; the few bytes of room left
/// between a short header and it are closed up by moving it at most eight bytes.
pub fn encode_text_into(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.resize(at + MAX_HEADER_LEN, 0);
    write(out);
    let len = out.len() - at - MAX_HEADER_LEN;
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let n = encode_header(OpCode::Text, len, &mut hdr);
    out[at..at + n].copy_from_slice(&hdr[..n]);
    out.drain(at + n..at + MAX_HEADER_LEN);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_at_boundaries() {
        let mut h = [0u8; MAX_HEADER_LEN];
        assert_eq!(encode_header(OpCode::Text, 125, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 125]);
        assert_eq!(encode_header(OpCode::Text, 126, &mut h), 4);
        assert_eq!(&h[..4], &[0x81, 126, 0, 126]);
        assert_eq!(encode_header(OpCode::Text, 65_535, &mut h), 4);
        assert_eq!(encode_header(OpCode::Close, 65_536, &mut h), 10);
        assert_eq!(&h[..10], &[0x88, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
            assert_eq!(header_len(len), encode_header(OpCode::Text, len, &mut h));
        }
    }

    #[test]
    fn in_place_text_frame_matches_plain_encoding() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let a = encode(OpCode::Text, &payload);
            let b = encode_text_with(0, |buf| buf.extend_from_slice(&payload));
            assert_eq!(a, b, "len {len}");
        }
    }

    #[test]
    fn a_frame_appended_after_other_bytes_is_the_same_frame() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'y'; len];
            let mut out = b"HTTP/1.1 101 ...\r\n\r\n".to_vec();
            let before = out.len();
            encode_text_into(&mut out, |b| b.extend_from_slice(&payload));
            assert_eq!(
                &out[before..],
                &encode(OpCode::Text, &payload)[..],
                "len {len}"
            );
        }
    }

    #[test]
    fn tungstenite_reads_our_frames() {
        use std::io::Cursor;
        use tungstenite::protocol::frame::FrameHeader;
        let f = encode(OpCode::Text, &vec![b'a'; 300]);
        let mut cur = Cursor::new(&f[..]);
        let (hdr, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        assert!(hdr.is_final);
        assert!(hdr.mask.is_none());
        assert_eq!(len, 300);
        assert_eq!(cur.position() as usize + 300, f.len());
    }
}
