//! `permessage-deflate` (RFC 7692) on frames: an event frame compressed once into a frame every
//! subscriber that negotiated the extension can be sent, and a client's compressed message
//! inflated within a bound.
//!
//! With `server_no_context_takeover` every compressed message stands alone, so one compressor
//! per shard serves every connection: the one-shot encoder (`ws::oneshot`), which compresses a
//! whole message in one block and has nothing to clear between messages, and the frame it makes
//! is shared by reference like the plain one. A message is compressed only when it is at least
//! `min_bytes` and compressing makes it smaller (the caller then sends the plain frame).
//!
//! Inflating refuses a message the moment its output passes the bound, before more is produced:
//! a small compressed frame that would inflate to gigabytes costs at most the bound.

use super::frame::{encode_header, header_len_of, OpCode, MAX_HEADER_LEN};
use super::oneshot::{OneShot, MAX_INPUT};
use super::SharedFrame;
use flate2::{Decompress, FlushDecompress, Status};

/// The four bytes a sync flush ends with, removed from a message and added back to inflate it.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The RSV1 bit: this message is compressed.
pub const RSV1: u8 = 0x40;

/// One shard's compressor: the one-shot encoder (`ws::oneshot`), which keeps nothing between
/// messages that needs clearing.
#[derive(Default)]
pub struct Deflater {
    one: OneShot,
    out: Vec<u8>,
}

impl Deflater {
    /// The compressed form of a plain, unfragmented server frame (`frame`: header and payload),
    /// or `None` when its payload is under `min_bytes` or would not get smaller.
    pub fn compress_frame(&mut self, frame: &[u8], min_bytes: usize) -> Option<SharedFrame> {
        let h = header_len_of(frame);
        if h == 0 || frame[0] & 0x70 != 0 {
            return None; // not a frame this server built, or compressed already
        }
        if frame[0] & 0x0f != OpCode::Text as u8 {
            return None; // the server sends only text messages; control frames stay plain
        }
        let opcode = OpCode::Text;
        let payload = &frame[h..];
        if payload.len() < min_bytes.max(1) {
            return None;
        }
        if payload.len() > MAX_INPUT {
            return None;
        }
        self.out.clear();
        self.one.compress(payload, &mut self.out);
        let body = &self.out[..];
        if body.len() >= payload.len() {
            return None;
        }
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let n = encode_header(opcode, body.len(), &mut hdr);
        hdr[0] |= RSV1;
        let mut buf = Vec::with_capacity(n + body.len());
        buf.extend_from_slice(&hdr[..n]);
        buf.extend_from_slice(body);
        Some(SharedFrame::from(buf))
    }
}

thread_local! {
    /// Each thread's compressor (a shard's: one per shard, never per connection).
    static DEFLATER: std::cell::RefCell<Deflater> = std::cell::RefCell::new(Deflater::default());
}

/// [`Deflater::compress_frame`] with this thread's compressor.
pub fn compress_shared(frame: &[u8], min_bytes: usize) -> Option<SharedFrame> {
    DEFLATER.with(|d| d.borrow_mut().compress_frame(frame, min_bytes))
}

/// Why a compressed client message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the bound (close 1009).
    TooLarge,
    /// It is not valid DEFLATE data (close 1007).
    Invalid,
}

/// A connection's inflater, made only for a client that sends a compressed message (most never
/// do). It inflates a message as its frames arrive, counting what comes out: the server reads no
/// client message, so the output passes through a fixed buffer and none of it is kept, and the
/// message is refused the moment the count passes the bound. It keeps the client's LZ77 window
/// across messages unless the client gave up context takeover.
pub struct Inflater {
    d: Decompress,
    reset_each: bool,
    /// The frame in progress: its masking key, its bytes seen so far, the bytes still to come,
    /// and whether it ends the message.
    mask: [u8; 4],
    seen: u32,
    left: u32,
    fin: bool,
    /// What the message in progress has inflated to so far.
    produced: u64,
}

/// Output bytes inflated per step (on the stack).
const INFLATE_CHUNK: usize = 4096;

impl Inflater {
    /// For a client that compresses with a `window_bits` window (9 to 15; 8 is inflated as 9)
    /// and that negotiated `client_no_context_takeover` (`reset_each`) or not.
    pub fn new(window_bits: u8, reset_each: bool) -> Inflater {
        Inflater {
            d: Decompress::new_with_window_bits(false, window_bits.clamp(9, 15)),
            reset_each,
            mask: [0; 4],
            seen: 0,
            left: 0,
            fin: false,
            produced: 0,
        }
    }

    /// Whether each message starts afresh (the client gave up context takeover).
    pub fn resets_each(&self) -> bool {
        self.reset_each
    }

    /// A frame of a compressed message begins (its header's masking key, payload length, and
    /// whether it is the last). True when the message ended with it (an empty last frame).
    pub fn frame(
        &mut self,
        mask: [u8; 4],
        len: u32,
        fin: bool,
        max: u64,
    ) -> Result<bool, InflateError> {
        (self.mask, self.seen, self.left, self.fin) = (mask, 0, len, fin);
        if len == 0 && fin {
            return self.end(max, &mut |_| {});
        }
        Ok(false)
    }

    /// Payload bytes of the frame in progress, still masked. True when they end the message.
    pub fn bytes(&mut self, masked: &[u8], max: u64) -> Result<bool, InflateError> {
        self.bytes_into(masked, max, &mut |_| {})
    }

    /// [`Inflater::bytes`], handing what it inflates to `sink`.
    pub(crate) fn bytes_into(
        &mut self,
        masked: &[u8],
        max: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<bool, InflateError> {
        let masked = &masked[..masked.len().min(self.left as usize)];
        let mut plain = [0u8; 1024];
        for chunk in masked.chunks(plain.len()) {
            for (i, (p, &m)) in plain.iter_mut().zip(chunk).enumerate() {
                *p = m ^ self.mask[(self.seen as usize + i) & 3];
            }
            self.seen = self.seen.wrapping_add(chunk.len() as u32);
            self.inflate(&plain[..chunk.len()], max, sink)?;
        }
        self.left -= masked.len() as u32;
        if self.left == 0 && self.fin {
            return self.end(max, sink);
        }
        Ok(false)
    }

    /// The message is complete: the sync flush's tail the sender removed goes back in.
    fn end(&mut self, max: u64, sink: &mut dyn FnMut(&[u8])) -> Result<bool, InflateError> {
        let result = self.inflate(&TAIL, max, sink);
        self.produced = 0;
        if self.reset_each || result.is_err() {
            self.d.reset(false);
        }
        result.map(|()| true)
    }

    /// Inflates `input`; a refused message leaves the inflater ready for the next one (the
    /// connection is closing anyway).
    fn inflate(
        &mut self,
        input: &[u8],
        max: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), InflateError> {
        let result = self.inflate_inner(input, max, sink);
        if result.is_err() {
            self.produced = 0;
            self.d.reset(false);
        }
        result
    }

    fn inflate_inner(
        &mut self,
        mut input: &[u8],
        max: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), InflateError> {
        let mut out = [0u8; INFLATE_CHUNK];
        loop {
            let (before_in, before_out) = (self.d.total_in(), self.d.total_out());
            let status = self
                .d
                .decompress(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            let consumed = (self.d.total_in() - before_in) as usize;
            let produced = (self.d.total_out() - before_out) as usize;
            input = &input[consumed..];
            self.produced += produced as u64;
            if self.produced > max {
                return Err(InflateError::TooLarge);
            }
            sink(&out[..produced]);
            if status == Status::StreamEnd {
                // A final block (BFINAL): nothing may follow it in this message but the tail.
                self.d.reset(false);
                return if input.iter().all(|&b| b == 0) || input == TAIL {
                    Ok(())
                } else {
                    Err(InflateError::Invalid)
                };
            }
            if produced == out.len() {
                continue; // more output may be waiting
            }
            if input.is_empty() {
                return Ok(());
            }
            if consumed == 0 && produced == 0 {
                return Err(InflateError::Invalid);
            }
        }
    }

    /// Inflates one whole message (`data`: the payloads of its frames, unmasked, concatenated),
    /// refusing it as soon as the output passes `max` bytes; returns what it inflated to.
    pub fn inflate_message(&mut self, data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        let len = u32::try_from(data.len()).map_err(|_| InflateError::TooLarge)?;
        let max = max as u64;
        if self.frame([0; 4], len, true, max)? {
            return Ok(out);
        }
        self.bytes_into(data, max, &mut |b| out.extend_from_slice(b))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode;
    use flate2::{Compress, Compression, FlushCompress};

    fn payload_of(frame: &[u8]) -> &[u8] {
        &frame[header_len_of(frame)..]
    }

    /// What any RFC 7692 client does with a compressed message.
    fn inflate(body: &[u8]) -> Vec<u8> {
        Inflater::new(15, true)
            .inflate_message(body, 1 << 24)
            .unwrap()
    }

    #[test]
    fn an_event_frame_compresses_to_a_frame_that_inflates_back_exactly() {
        let text = br#"{"type":"issue.created","payload":{"id":"iss_123","title":"Checkout fails on Safari","severity":"high","service":"web-checkout","count":42,"note":"checkout checkout checkout"},"ts":"2026-12-05T16:00:00.000Z"}"#;
        let plain = encode(OpCode::Text, text);
        let mut d = Deflater::default();
        let c = d.compress_frame(&plain, 128).expect("smaller");
        assert_eq!(c[0], 0x80 | RSV1 | 0x1, "FIN, RSV1, text");
        assert!(c.len() < plain.len(), "{} >= {}", c.len(), plain.len());
        assert_eq!(inflate(payload_of(&c)), text);
        // The compressor starts afresh each time: the same frame compresses to the same bytes.
        let again = d.compress_frame(&plain, 128).unwrap();
        assert_eq!(again, c);
        // Large frames too (16- and 64-bit lengths).
        for n in [200usize, 70_000] {
            let big: Vec<u8> = (0..n).map(|i| b"abcdefgh"[(i * 7 + i / 13) % 8]).collect();
            let plain = encode(OpCode::Text, &big);
            let c = d.compress_frame(&plain, 128).unwrap();
            assert_eq!(inflate(payload_of(&c)), big);
        }
    }

    #[test]
    fn small_incompressible_and_control_frames_stay_plain() {
        let mut d = Deflater::default();
        assert!(d
            .compress_frame(&encode(OpCode::Text, b"{\"a\":1}"), 128)
            .is_none());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..600)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert!(d
            .compress_frame(&encode(OpCode::Text, &noise), 128)
            .is_none());
        assert!(d
            .compress_frame(&encode(OpCode::Ping, &[b'x'; 100]), 1)
            .is_none());
        let compressed = d
            .compress_frame(&encode(OpCode::Text, &[b'x'; 300]), 1)
            .unwrap();
        assert!(
            d.compress_frame(&compressed, 1).is_none(),
            "compressed already"
        );
        assert!(d.compress_frame(&[], 1).is_none());
    }

    #[test]
    fn a_bomb_is_refused_at_the_bound_and_garbage_as_invalid() {
        let mut d = Deflater::default();
        let huge = vec![b'a'; 4 << 20];
        let c = d.compress_frame(&encode(OpCode::Text, &huge), 1).unwrap();
        let body = payload_of(&c);
        assert!(body.len() < 8 << 10, "{}", body.len());
        let mut i = Inflater::new(15, false);
        assert_eq!(
            i.inflate_message(body, 64 << 10),
            Err(InflateError::TooLarge)
        );
        // The inflater is usable again afterwards.
        let small = d
            .compress_frame(&encode(OpCode::Text, &[b'b'; 500]), 1)
            .unwrap();
        assert_eq!(
            i.inflate_message(payload_of(&small), 64 << 10).unwrap(),
            vec![b'b'; 500]
        );
        assert_eq!(
            Inflater::new(15, true).inflate_message(&[0xff, 0xff, 0xff, 0x00, 0x12], 1 << 20),
            Err(InflateError::Invalid)
        );
        // Exactly at the bound is fine.
        assert_eq!(
            Inflater::new(15, true)
                .inflate_message(payload_of(&small), 500)
                .map(|v| v.len()),
            Ok(500)
        );
    }

    #[test]
    fn a_client_keeping_its_context_is_followed_across_messages() {
        // A client compressing with context takeover: its second message refers to the first.
        let mut c = Compress::new(Compression::default(), false);
        let mut m1 = Vec::with_capacity(1024);
        c.compress_vec(b"hello hello hello world", &mut m1, FlushCompress::Sync)
            .unwrap();
        let mut m2 = Vec::with_capacity(1024);
        c.compress_vec(b"hello hello hello world", &mut m2, FlushCompress::Sync)
            .unwrap();
        let strip = |m: &[u8]| m.strip_suffix(&TAIL).unwrap().to_vec();
        let mut i = Inflater::new(15, false);
        assert_eq!(
            i.inflate_message(&strip(&m1), 1024).unwrap(),
            b"hello hello hello world"
        );
        assert_eq!(
            i.inflate_message(&strip(&m2), 1024).unwrap(),
            b"hello hello hello world"
        );
    }
}
