//! Incremental decoder for client-to-server frames.
//!
//! Clients of this server send nothing but control frames; data messages are tolerated and
//! discarded up to a size bound. The decoder therefore never buffers a data payload: it skips it
//! as it streams past. What it does buffer is bounded by one frame header plus one control payload
//! (14 + 125 bytes), so a peer cannot make a connection grow.
//!
//! The partial-frame buffer belongs to the caller (a connection reuses the one it read its request
//! head into), so an idle decoder is three integers.
//!
//! Invariants:
//! - `pending` is empty, or holds the beginning of one frame that did not fit the last read.
//! - `skip > 0` only between frames' payload bytes of an ignored data frame; `pending` is then empty.

use super::close::{is_valid_received_code, CloseReason};

/// A control frame the connection must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Control<'a> {
    /// A ping with its (unmasked) application data; answer with a pong carrying it.
    Ping(&'a [u8]),
    /// A pong with its (unmasked) application data (an acknowledgement's position, or
    /// anything the peer chose).
    Pong(&'a [u8]),
    /// A close frame, with the peer's status code when it sent one.
    Close(Option<u16>),
    /// A data frame's header (its payload is skipped unread): counted, never answered.
    Data,
    /// The header of a frame of a compressed message (RSV1 on its first frame, after
    /// `permessage-deflate` was negotiated): its masking key, its payload length, and whether it
    /// ends the message. Its payload follows, in order, as [`Control::Compressed`] chunks.
    CompressedFrame {
        /// The frame's masking key.
        mask: [u8; 4],
        /// Its payload length.
        len: u32,
        /// It is the message's last frame.
        fin: bool,
    },
    /// Payload bytes of a compressed message's frame, still masked (a chunk of what one read
    /// brought; not a frame of its own).
    Compressed(&'a [u8]),
}

/// Why a client's byte stream cannot be accepted. Each maps to one close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// RFC 6455 violation; the string says which (for logs, never sent).
    Protocol(&'static str),
    /// A data message over the configured bound.
    TooBig,
    /// A close reason that is not UTF-8.
    InvalidUtf8,
}

impl DecodeError {
    /// The close reason this error is answered with.
    pub fn close_reason(self) -> CloseReason {
        match self {
            DecodeError::Protocol(_) => CloseReason::Protocol,
            DecodeError::TooBig => CloseReason::TooBig,
            DecodeError::InvalidUtf8 => CloseReason::InvalidPayload,
        }
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

enum Parsed {
    NeedMore(usize),
    Header(Header),
}

fn parse_header(buf: &[u8]) -> Parsed {
    if buf.len() < 2 {
        return Parsed::NeedMore(2);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Parsed::NeedMore(header_len);
    }
    let len = match ext {
        2 => u16::from_be_bytes([buf[2], buf[3]]) as u64,
        8 => u64::from_be_bytes(buf[2..10].try_into().unwrap_or([0xff; 8])),
        _ => len7 as u64,
    };
    let mask = masked.then(|| {
        let m = &buf[2 + ext..2 + ext + 4];
        [m[0], m[1], m[2], m[3]]
    });
    Parsed::Header(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        mask,
        len,
        header_len,
    })
}

/// Per-connection decoder state: eight bytes, because a million connections each carry one.
#[derive(Debug)]
pub struct Decoder {
    /// Payload bytes of the data frame in progress still to pass (its low 31 bits, bounded by
    /// the message limit), with [`COMPRESSED`] set when they belong to a compressed message:
    /// those are handed on as [`Control::Compressed`], the others skipped unread.
    skip: u32,
    /// Bytes of the fragmented data message in progress (its low 31 bits, with [`COMPRESSED`]
    /// set for a compressed message), or [`NO_MESSAGE`] between messages (a message is bounded
    /// to [`MAX_MESSAGE`], so the sentinel cannot collide).
    message_len: u32,
}

const NO_MESSAGE: u32 = u32::MAX;
/// The flag bit of `skip` and `message_len`: a compressed message.
const COMPRESSED: u32 = 1 << 31;
/// The low bits: a length.
const LENGTH: u32 = COMPRESSED - 1;
/// The largest data message the decoder can count (below 2 GiB; the configuration's bound is
/// far lower).
pub const MAX_MESSAGE: u64 = (LENGTH - 1) as u64;

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            skip: 0,
            message_len: NO_MESSAGE,
        }
    }
}

impl Decoder {
    /// Feeds bytes read from the socket; calls `on_control` for each complete control frame.
    ///
    /// After an error the decoder must not be fed again; the connection closes with
    /// [`DecodeError::close_reason`].
    pub fn feed(
        &mut self,
        pending: &mut Vec<u8>,
        input: &[u8],
        max_message: u64,
        on_control: &mut dyn FnMut(Control<'_>),
    ) -> Result<(), DecodeError> {
        self.feed_with(pending, input, max_message, false, on_control)
    }

    /// [`Decoder::feed`] for a connection that negotiated `permessage-deflate` (`deflate`): the
    /// first frame of a data message may carry RSV1 (compressed). Plain data messages are
    /// skipped unread; a compressed one's frames are handed on ([`Control::CompressedFrame`],
    /// then its payload as [`Control::Compressed`] chunks) for the caller to inflate within the
    /// bound.
    pub fn feed_with(
        &mut self,
        pending: &mut Vec<u8>,
        mut input: &[u8],
        max_message: u64,
        deflate: bool,
        on_control: &mut dyn FnMut(Control<'_>),
    ) -> Result<(), DecodeError> {
        loop {
            if self.skip & LENGTH > 0 {
                let n = ((self.skip & LENGTH) as usize).min(input.len());
                if self.skip & COMPRESSED != 0 && n > 0 {
                    on_control(Control::Compressed(&input[..n]));
                }
                self.skip -= n as u32;
                input = &input[n..];
                if self.skip & LENGTH > 0 {
                    return Ok(());
                }
                self.skip = 0;
            }
            if input.is_empty() && pending.is_empty() {
                return Ok(());
            }
            if pending.is_empty() {
                match self.step(input, max_message, deflate, on_control)? {
                    Some(used) => input = &input[used..],
                    None => {
                        // The start of a frame that did not arrive whole: keep it (bounded by
                        // the step's checks to one header plus one control payload).
                        pending.extend_from_slice(input);
                        return Ok(());
                    }
                }
            } else {
                // Top the pending frame up with just the bytes it needs, then decode it.
                let need = match parse_header(pending) {
                    Parsed::NeedMore(n) => n,
                    // An oversized control frame is refused as soon as its header is complete.
                    Parsed::Header(h) if is_control(h.opcode) && h.len <= 125 => {
                        h.header_len + h.len as usize
                    }
                    Parsed::Header(h) => h.header_len,
                };
                if pending.len() < need {
                    let take = (need - pending.len()).min(input.len());
                    pending.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if pending.len() < need {
                        return Ok(());
                    }
                    continue;
                }
                let frame = std::mem::take(pending);
                match self.step(&frame, max_message, deflate, on_control)? {
                    Some(used) => {
                        debug_assert_eq!(used, frame.len());
                        // Keep the allocation for the next partial frame.
                        let mut frame = frame;
                        frame.clear();
                        *pending = frame;
                    }
                    None => *pending = frame,
                }
                if input.is_empty() {
                    return Ok(());
                }
            }
        }
    }

    /// Decodes one frame from the start of `buf`. Returns the bytes consumed (a data frame's
    /// header only: its payload is skipped by `skip`), or `None` if `buf` holds less than needed.
    fn step(
        &mut self,
        buf: &[u8],
        max_message: u64,
        deflate: bool,
        on_control: &mut dyn FnMut(Control<'_>),
    ) -> Result<Option<usize>, DecodeError> {
        // RSV1 marks a compressed message: allowed only on a message's first frame, and only
        // once `permessage-deflate` was negotiated (RFC 7692 §6).
        let rsv_ok = |rsv: u8, opcode: u8| {
            rsv == 0 || (deflate && rsv == 0b100 && (opcode == 1 || opcode == 2))
        };
        let h = match parse_header(buf) {
            Parsed::NeedMore(_) => {
                // Validate what we can already see so that junk is rejected without waiting.
                if let Some(&b0) = buf.first() {
                    if !rsv_ok((b0 >> 4) & 0x7, b0 & 0x0f) {
                        return Err(DecodeError::Protocol("reserved bits set"));
                    }
                }
                return Ok(None);
            }
            Parsed::Header(h) => h,
        };
        if !rsv_ok(h.rsv, h.opcode) {
            return Err(DecodeError::Protocol("reserved bits set"));
        }
        let Some(mask) = h.mask else {
            return Err(DecodeError::Protocol("unmasked client frame"));
        };
        if h.len > i64::MAX as u64 {
            return Err(DecodeError::Protocol("length with the high bit set"));
        }
        match h.opcode {
            0x8..=0xA => {
                if !h.fin {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                if h.len > 125 {
                    return Err(DecodeError::Protocol("control frame over 125 bytes"));
                }
                let total = h.header_len + h.len as usize;
                if buf.len() < total {
                    return Ok(None);
                }
                let mut payload = [0u8; 125];
                let payload = &mut payload[..h.len as usize];
                payload.copy_from_slice(&buf[h.header_len..total]);
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i & 3];
                }
                let control = match h.opcode {
                    0x9 => Control::Ping(payload),
                    0xA => Control::Pong(payload),
                    _ => Control::Close(parse_close(payload)?),
                };
                on_control(control);
                Ok(Some(total))
            }
            0x1 | 0x2 => {
                if self.message_len != NO_MESSAGE {
                    return Err(DecodeError::Protocol("new message inside a fragmented one"));
                }
                let compressed = if h.rsv != 0 { COMPRESSED } else { 0 };
                self.data_frame(h, mask, h.len, compressed, max_message, on_control)
            }
            0x0 => {
                if self.message_len == NO_MESSAGE {
                    return Err(DecodeError::Protocol("continuation without a message"));
                }
                let total = ((self.message_len & LENGTH) as u64).saturating_add(h.len);
                let compressed = self.message_len & COMPRESSED;
                self.data_frame(h, mask, total, compressed, max_message, on_control)
            }
            _ => Err(DecodeError::Protocol("unknown opcode")),
        }
    }
}

impl Decoder {
    /// A data frame's header: the message so far is `total` bytes with this frame; its payload
    /// is skipped, or handed on when the message is `compressed`.
    fn data_frame(
        &mut self,
        h: Header,
        mask: [u8; 4],
        total: u64,
        compressed: u32,
        max_message: u64,
        on_control: &mut dyn FnMut(Control<'_>),
    ) -> Result<Option<usize>, DecodeError> {
        if total > max_message || total > MAX_MESSAGE {
            return Err(DecodeError::TooBig);
        }
        self.message_len = if h.fin {
            NO_MESSAGE
        } else {
            total as u32 | compressed
        };
        self.skip = h.len as u32 | compressed;
        on_control(if compressed != 0 {
            Control::CompressedFrame {
                mask,
                len: h.len as u32,
                fin: h.fin,
            }
        } else {
            Control::Data
        });
        Ok(Some(h.header_len))
    }
}

fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, DecodeError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(DecodeError::Protocol("one-byte close payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_received_code(code) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a masked client frame the way a browser would.
    pub(crate) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[derive(Debug, PartialEq)]
    enum Got {
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
        Data,
    }

    fn run(chunks: &[&[u8]]) -> (Vec<Got>, Result<(), DecodeError>) {
        let mut d = Decoder::default();
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for c in chunks {
            let r = d.feed(&mut pending, c, 4096, &mut |c| {
                got.push(match c {
                    Control::Ping(p) => Got::Ping(p.to_vec()),
                    Control::Pong(_) => Got::Pong,
                    Control::Close(c) => Got::Close(c),
                    Control::Data => Got::Data,
                    Control::CompressedFrame { .. } | Control::Compressed(_) => {
                        unreachable!("no permessage-deflate negotiated here")
                    }
                })
            });
            if r.is_err() {
                return (got, r);
            }
            assert!(pending.len() <= 14 + 125);
        }
        (got, Ok(()))
    }

    #[test]
    fn ping_and_close_in_one_read() {
        let mut bytes = client_frame(true, 0x9, b"hello");
        let mut close = vec![0x03, 0xe8];
        close.extend_from_slice(b"bye");
        bytes.extend(client_frame(true, 0x8, &close));
        let (got, r) = run(&[&bytes]);
        assert!(r.is_ok());
        assert_eq!(
            got,
            vec![Got::Ping(b"hello".to_vec()), Got::Close(Some(1000))]
        );
    }

    #[test]
    fn every_split_point_decodes_the_same() {
        let mut bytes = client_frame(true, 0x1, &vec![b'x'; 300]);
        bytes.extend(client_frame(true, 0x9, b"p1"));
        bytes.extend(client_frame(false, 0x2, &[1, 2, 3]));
        bytes.extend(client_frame(true, 0x0, &[4]));
        bytes.extend(client_frame(true, 0xA, b""));
        bytes.extend(client_frame(true, 0x8, &[]));
        let want = vec![
            Got::Data,
            Got::Ping(b"p1".to_vec()),
            Got::Data,
            Got::Data,
            Got::Pong,
            Got::Close(None),
        ];
        for a in 0..bytes.len() {
            for b in [a, (a + 7).min(bytes.len()), bytes.len()] {
                let (got, r) = run(&[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                assert!(r.is_ok(), "split {a}/{b}: {r:?}");
                assert_eq!(got, want, "split {a}/{b}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let bytes = client_frame(true, 0x9, &[7u8; 125]);
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let (got, r) = run(&chunks);
        assert!(r.is_ok());
        assert_eq!(got, vec![Got::Ping(vec![7u8; 125])]);
    }

    #[test]
    fn violations_map_to_close_codes() {
        let unmasked = [0x89u8, 0x00];
        assert_eq!(run(&[&unmasked]).1.unwrap_err().close_reason().code(), 1002);
        let mut rsv = client_frame(true, 0x9, b"");
        rsv[0] |= 0x40;
        assert_eq!(run(&[&rsv]).1.unwrap_err().close_reason().code(), 1002);
        assert_eq!(
            run(&[&client_frame(true, 0x3, b"")])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        assert_eq!(
            run(&[&client_frame(false, 0x9, b"")])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        assert_eq!(
            run(&[&client_frame(true, 0x9, &[0; 126])])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        assert_eq!(
            run(&[&client_frame(true, 0x0, b"x")])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        let mut two = client_frame(false, 0x1, b"a");
        two.extend(client_frame(true, 0x1, b"b"));
        assert_eq!(run(&[&two]).1.unwrap_err().close_reason().code(), 1002);
        assert_eq!(
            run(&[&client_frame(true, 0x8, &[3])])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        assert_eq!(
            run(&[&client_frame(true, 0x8, &[0x03, 0xed])])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1002
        );
        assert_eq!(
            run(&[&client_frame(true, 0x8, &[0x03, 0xe8, 0xff])])
                .1
                .unwrap_err()
                .close_reason()
                .code(),
            1007
        );
    }

    #[test]
    fn data_is_bounded_without_buffering() {
        assert!(run(&[&client_frame(true, 0x1, &[b'a'; 4096])]).1.is_ok());
        // The oversize frame is rejected from its header alone.
        let big = client_frame(true, 0x2, &[0; 4097]);
        assert_eq!(run(&[&big[..8]]).1.unwrap_err(), DecodeError::TooBig);
        // Fragments add up.
        let mut frag = client_frame(false, 0x1, &[b'a'; 4000]);
        frag.extend(client_frame(true, 0x0, &[b'a'; 97]));
        assert_eq!(run(&[&frag]).1.unwrap_err(), DecodeError::TooBig);
        // A header claiming 2^63 bytes is refused.
        let mut huge = vec![0x82u8, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(run(&[&huge]).1.is_err());
    }

    /// A message compressed as a client would (raw DEFLATE, sync flush, its tail removed).
    fn compressed(text: &[u8]) -> Vec<u8> {
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        c.compress_vec(text, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn a_compressed_message_is_handed_on_frame_by_frame_and_inflates_exactly() {
        let text: Vec<u8> = b"a client message that repeats, repeats, repeats itself "
            .iter()
            .cycle()
            .take(3000)
            .copied()
            .collect();
        let body = compressed(&text);
        let (a, b) = body.split_at(body.len() / 3);
        // First frame: RSV1, text, not final; then a ping between the fragments; then the end.
        let mut first = client_frame(false, 0x1, a);
        first[0] |= 0x40;
        let mut bytes = first;
        bytes.extend(client_frame(true, 0x9, b"mid"));
        bytes.extend(client_frame(true, 0x0, b));
        for split in [1, 7, 64, bytes.len()] {
            let mut d = Decoder::default();
            let mut pending = Vec::new();
            let mut inflater = crate::ws::deflate::Inflater::new(15, false);
            let (mut out, mut ended, mut pings) = (Vec::new(), 0, 0);
            for chunk in bytes.chunks(split) {
                d.feed_with(&mut pending, chunk, 1 << 20, true, &mut |c| match c {
                    Control::CompressedFrame { mask, len, fin } => {
                        if inflater.frame(mask, len, fin, 1 << 20).unwrap() {
                            ended += 1;
                        }
                    }
                    Control::Compressed(masked) => {
                        if inflater
                            .bytes_into(masked, 1 << 20, &mut |b| out.extend_from_slice(b))
                            .unwrap()
                        {
                            ended += 1;
                        }
                    }
                    Control::Ping(_) => pings += 1,
                    other => panic!("{other:?}"),
                })
                .unwrap();
            }
            assert_eq!((ended, pings), (1, 1), "split {split}");
            assert_eq!(out, text, "split {split}");
        }
    }

    #[test]
    fn compressed_frames_count_against_the_message_bound_and_need_the_extension() {
        let body = compressed(&[b'x'; 5000]);
        let mut frame = client_frame(true, 0x2, &body);
        frame[0] |= 0x40;
        let mut d = Decoder::default();
        let r = d.feed_with(
            &mut Vec::new(),
            &frame,
            body.len() as u64 - 1,
            true,
            &mut |_| {},
        );
        assert_eq!(r, Err(DecodeError::TooBig));
        let mut d = Decoder::default();
        let r = d.feed(&mut Vec::new(), &frame, 1 << 20, &mut |_| {});
        assert_eq!(r, Err(DecodeError::Protocol("reserved bits set")));
    }
}
