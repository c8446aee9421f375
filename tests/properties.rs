//! Property tests for the two pieces of state every connection leans on: the client-frame
//! decoder and the timer wheel, each against a model simple enough to be obviously right.
//!
//! proptest shrinks a failure to a minimal case and records its seed in
//! `tests/properties.proptest-regressions`, which is committed and replayed first on every run.

use causeloop_stream::timer::wheel::{TimerId, Wheel};
use causeloop_stream::ws::decoder::{Control, DecodeError, Decoder};
use proptest::prelude::*;
use std::collections::BTreeMap;

const MAX_MESSAGE: u64 = 4096;

/// One client frame as a test describes it.
#[derive(Clone, Debug)]
enum ClientFrame {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A data message, split into `parts` fragments (text or binary).
    Message {
        len: usize,
        parts: usize,
        text: bool,
    },
    Close(Option<u16>),
}

/// What the decoder should report for a frame sequence, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Ping(Vec<u8>),
    Pong,
    Data,
    Close(Option<u16>),
}

fn masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn encode(frames: &[ClientFrame], mask: [u8; 4]) -> (Vec<u8>, Vec<Seen>) {
    let (mut bytes, mut seen) = (Vec::new(), Vec::new());
    for f in frames {
        match f {
            ClientFrame::Ping(p) => {
                bytes.extend(masked(true, 0x9, p, mask));
                seen.push(Seen::Ping(p.clone()));
            }
            ClientFrame::Pong(p) => {
                bytes.extend(masked(true, 0xA, p, mask));
                seen.push(Seen::Pong);
            }
            ClientFrame::Message { len, parts, text } => {
                let parts = (*parts).max(1);
                for i in 0..parts {
                    let chunk = len / parts + usize::from(i < len % parts);
                    let opcode = match (i, text) {
                        (0, true) => 0x1,
                        (0, false) => 0x2,
                        _ => 0x0,
                    };
                    bytes.extend(masked(i + 1 == parts, opcode, &vec![b'a'; chunk], mask));
                    seen.push(Seen::Data);
                }
            }
            ClientFrame::Close(code) => {
                let payload = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
                bytes.extend(masked(true, 0x8, &payload, mask));
                seen.push(Seen::Close(*code));
            }
        }
    }
    (bytes, seen)
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(ClientFrame::Ping),
        prop::collection::vec(any::<u8>(), 0..=125).prop_map(ClientFrame::Pong),
        (0..=MAX_MESSAGE as usize, 1..4usize, any::<bool>())
            .prop_map(|(len, parts, text)| ClientFrame::Message { len, parts, text }),
        prop::option::of(prop_oneof![Just(1000u16), Just(1001), 3000..5000u16])
            .prop_map(ClientFrame::Close),
    ]
}

/// Feeds `bytes` in pieces cut at `cuts`; returns what the decoder reported and its result.
fn decode(bytes: &[u8], cuts: &[usize]) -> (Vec<Seen>, Result<(), DecodeError>, usize) {
    let mut d = Decoder::default();
    let mut pending = Vec::new();
    let mut seen = Vec::new();
    let mut most_pending = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut start = 0;
    for end in points.into_iter().chain([bytes.len()]) {
        let r = d.feed(&mut pending, &bytes[start..end], MAX_MESSAGE, &mut |c| {
            seen.push(match c {
                Control::Ping(p) => Seen::Ping(p.to_vec()),
                Control::Pong(_) => Seen::Pong,
                Control::Data => Seen::Data,
                Control::Close(c) => Seen::Close(c),
                Control::CompressedFrame { .. } | Control::Compressed(_) => {
                    unreachable!("no permessage-deflate negotiated here")
                }
            })
        });
        most_pending = most_pending.max(pending.len());
        if r.is_err() {
            return (seen, r, most_pending);
        }
        start = end;
    }
    (seen, Ok(()), most_pending)
}

proptest! {
    /// Any valid frame sequence, cut anywhere, decodes to the same reports, in order, and never
    /// buffers more than one header and one control payload.
    #[test]
    fn valid_streams_decode_the_same_however_they_are_cut(
        frames in prop::collection::vec(client_frame(), 1..12),
        mask in any::<[u8; 4]>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (bytes, want) = encode(&frames, mask);
        let (seen, result, most_pending) = decode(&bytes, &cuts);
        prop_assert_eq!(result, Ok(()));
        prop_assert_eq!(seen, want);
        prop_assert!(most_pending <= 14 + 125);
    }

    /// Arbitrary bytes never panic the decoder and never make it buffer past its bound.
    #[test]
    fn arbitrary_bytes_are_refused_or_decoded_within_bounds(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let (_, _, most_pending) = decode(&bytes, &cuts);
        prop_assert!(most_pending <= 14 + 125);
    }

    /// A message over the limit is refused with TooBig, whether whole or fragmented.
    #[test]
    fn oversized_messages_are_refused(extra in 1..2000usize, parts in 1..4usize) {
        let frames = [ClientFrame::Message { len: MAX_MESSAGE as usize + extra, parts, text: true }];
        let (bytes, _) = encode(&frames, [9, 8, 7, 6]);
        let (_, result, _) = decode(&bytes, &[]);
        prop_assert_eq!(result, Err(DecodeError::TooBig));
    }
}

/// An operation on the wheel.
#[derive(Clone, Debug)]
enum Op {
    /// Schedule at `current + delta` (a zero delta means "already due").
    Insert(u64),
    /// Cancel the n-th live timer (modulo the number live).
    Cancel(usize),
    /// Advance by this many ticks.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3000u64).prop_map(Op::Insert),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => prop_oneof![0..5u64, 0..300u64, 0..5000u64].prop_map(Op::Advance),
    ]
}

proptest! {
    /// The wheel against a map of live timers: every advance fires exactly the timers due, each
    /// once; cancel removes exactly one; `next_tick` is never later than the earliest deadline.
    #[test]
    fn the_wheel_fires_exactly_what_is_due(
        ops in prop::collection::vec(op(), 1..300),
        start in 0..1_000_000u64,
    ) {
        let mut wheel: Wheel<u64> = Wheel::new(256, start);
        let mut model: BTreeMap<u64, (u64, TimerId)> = BTreeMap::new();
        let mut now = start;
        let mut next_value = 0u64;
        let mut fired = Vec::new();
        for op in ops {
            match op {
                Op::Insert(delta) => {
                    let id = wheel.insert(now + delta, next_value);
                    model.insert(next_value, ((now + delta).max(now + 1), id));
                    next_value += 1;
                }
                Op::Cancel(n) => {
                    if model.is_empty() {
                        continue;
                    }
                    let value = *model.keys().nth(n % model.len()).unwrap();
                    let (_, id) = model.remove(&value).unwrap();
                    prop_assert_eq!(wheel.cancel(id), Some(value));
                }
                Op::Advance(by) => {
                    now += by;
                    fired.clear();
                    wheel.advance(now, &mut fired);
                    let mut want: Vec<u64> = model
                        .iter()
                        .filter(|(_, (deadline, _))| *deadline <= now)
                        .map(|(v, _)| *v)
                        .collect();
                    for v in &want {
                        model.remove(v);
                    }
                    fired.sort_unstable();
                    want.sort_unstable();
                    prop_assert_eq!(&fired, &want);
                }
            }
            prop_assert_eq!(wheel.len(), model.len());
            match model.values().map(|(d, _)| *d).min() {
                None => prop_assert_eq!(wheel.next_tick(), None),
                Some(earliest) => {
                    let next = wheel.next_tick().expect("timers are pending");
                    prop_assert!(next <= earliest, "next_tick {} after deadline {}", next, earliest);
                    prop_assert!(next > wheel.current());
                }
            }
        }
    }
}
