//! Acknowledgement by ping payload: the server's pings carry a position; every RFC 6455 client
//! echoes the payload in its pong, which tells the server the client has read every frame queued
//! before that ping. No client code is involved.
//!
//! The payload is 18 bytes: `cl` (so a pong to another ping, or an unsolicited one, is told
//! apart), then the epoch and the offset, big-endian. Pure: bytes in, a position out. A parsed
//! position is only a claim: the shard takes it only if it is one it sent to that connection
//! (same epoch, not beyond the last ping written, not behind the last acknowledgement).

use super::Position;

/// Length of an acknowledgement ping's payload.
pub const PAYLOAD_LEN: usize = 18;

const MAGIC: &[u8; 2] = b"cl";

/// The payload of the ping acknowledging `pos`.
pub fn payload(pos: Position) -> [u8; PAYLOAD_LEN] {
    let mut p = [0; PAYLOAD_LEN];
    p[..2].copy_from_slice(MAGIC);
    p[2..10].copy_from_slice(&pos.epoch.to_be_bytes());
    p[10..].copy_from_slice(&pos.offset.to_be_bytes());
    p
}

/// The position a pong's payload claims, if it is an acknowledgement ping's payload.
pub fn parse(pong: &[u8]) -> Option<Position> {
    if pong.len() != PAYLOAD_LEN || &pong[..2] != MAGIC {
        return None;
    }
    let epoch = u64::from_be_bytes(pong[2..10].try_into().ok()?);
    let offset = u64::from_be_bytes(pong[10..].try_into().ok()?);
    Some(Position { epoch, offset })
}

/// What a connection has been sent and has acknowledged, in one epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckState {
    /// The position of the last acknowledgement ping queued.
    pub sent: Position,
    /// The last position the client acknowledged (or where it started).
    pub acked: Position,
}

impl AckState {
    /// A connection that starts at `at` (it has, or needs, nothing up to there).
    pub fn starting_at(at: Position) -> AckState {
        AckState {
            sent: at,
            acked: at,
        }
    }

    /// Takes a pong's claim if it is believable; returns whether it moved the acknowledgement.
    pub fn on_pong(&mut self, claim: Position) -> bool {
        if claim.epoch != self.sent.epoch
            || claim.offset > self.sent.offset
            || (claim.epoch == self.acked.epoch && claim.offset <= self.acked.offset)
        {
            return false;
        }
        self.acked = claim;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: u64, offset: u64) -> Position {
        Position { epoch, offset }
    }

    #[test]
    fn a_payload_reads_back() {
        for p in [at(0, 0), at(1, 2), at(u64::MAX, u64::MAX - 1)] {
            assert_eq!(parse(&payload(p)), Some(p));
        }
    }

    #[test]
    fn anything_else_is_not_an_acknowledgement() {
        let good = payload(at(3, 4));
        assert_eq!(parse(&good[..17]), None);
        assert_eq!(parse(&[good.as_slice(), b"x"].concat()), None);
        assert_eq!(parse(b""), None);
        let mut bad = good;
        bad[0] = b'x';
        assert_eq!(parse(&bad), None);
    }

    #[test]
    fn stale_foreign_and_future_claims_are_ignored() {
        let mut s = AckState::starting_at(at(1, 10));
        s.sent = at(1, 20);
        assert!(!s.on_pong(at(1, 21)), "beyond what was sent");
        assert!(!s.on_pong(at(2, 15)), "another epoch");
        assert!(!s.on_pong(at(1, 10)), "not past the last acknowledgement");
        assert!(s.on_pong(at(1, 15)));
        assert!(!s.on_pong(at(1, 12)), "stale");
        assert!(s.on_pong(at(1, 20)));
        assert_eq!(s.acked, at(1, 20));
        // A new epoch: acknowledgements of it count once a ping of it was sent.
        s.sent = at(2, 3);
        assert!(s.on_pong(at(2, 1)));
        assert_eq!(s.acked, at(2, 1));
    }
}
