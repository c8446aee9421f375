//! Close codes and close frames.
//!
//! This is the one table in the code that maps every way a connection can end to the close code a
//! client sees; `docs/protocol.md` carries the same table. Close frames for fixed reasons are
//! encoded once per process and shared.

use super::frame::{encode, OpCode};
use super::SharedFrame;
use std::sync::OnceLock;

/// The code a connection is counted and logged under when it was dropped as a dead peer (no pong
/// within `--ping-timeout`). RFC 6455's 1006, "closed abnormally": it is never sent on the wire,
/// since there is no one to read it.
pub const DEAD_PEER: u16 = 1006;

/// Why the server closes a WebSocket connection. Each reason has exactly one code and one phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Normal closure, used when echoing a client's close without a code.
    Normal,
    /// Graceful drain: SIGTERM/SIGINT or the library's shutdown.
    GoingAway,
    /// The client broke RFC 6455 (unmasked frame, bad opcode, reserved bits, bad close payload…).
    Protocol,
    /// A close frame whose reason was not UTF-8.
    InvalidPayload,
    /// The client's unsent bytes passed `--max-outbound-bytes`.
    SlowConsumer,
    /// The client sent more frames than `--max-client-frames-per-sec` allows.
    TooManyFrames,
    /// A client data message larger than `--max-client-frame-bytes`.
    TooBig,
    /// An unexpected server-side error in this connection.
    ServerError,
    /// `--max-connections` reached.
    TryAgainLater,
    /// Missing, malformed or badly signed token, or claims that fail validation.
    InvalidToken,
    /// The token's `exp` passed (at connect or while connected).
    TokenExpired,
    /// The token is not valid yet (`nbf` or `iat` in the future).
    TokenNotYetValid,
    /// The token's workspace claim differs from `workspace`, or `workspace` is missing.
    WorkspaceMismatch,
}

impl CloseReason {
    /// Every reason, for tables and tests.
    pub const ALL: [CloseReason; 13] = [
        CloseReason::Normal,
        CloseReason::GoingAway,
        CloseReason::Protocol,
        CloseReason::InvalidPayload,
        CloseReason::SlowConsumer,
        CloseReason::TooManyFrames,
        CloseReason::TooBig,
        CloseReason::ServerError,
        CloseReason::TryAgainLater,
        CloseReason::InvalidToken,
        CloseReason::TokenExpired,
        CloseReason::TokenNotYetValid,
        CloseReason::WorkspaceMismatch,
    ];

    /// The close code sent on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Normal => 1000,
            CloseReason::GoingAway => 1001,
            CloseReason::Protocol => 1002,
            CloseReason::InvalidPayload => 1007,
            CloseReason::SlowConsumer | CloseReason::TooManyFrames => 1008,
            CloseReason::TooBig => 1009,
            CloseReason::ServerError => 1011,
            CloseReason::TryAgainLater => 1013,
            CloseReason::InvalidToken
            | CloseReason::TokenExpired
            | CloseReason::TokenNotYetValid => 4401,
            CloseReason::WorkspaceMismatch => 4003,
        }
    }

    /// The short phrase sent as the close reason. Never contains request data.
    pub fn phrase(self) -> &'static str {
        match self {
            CloseReason::Normal => "",
            CloseReason::GoingAway => "server going away",
            CloseReason::Protocol => "protocol error",
            CloseReason::InvalidPayload => "invalid payload",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TooManyFrames => "too many frames",
            CloseReason::TooBig => "message too big",
            CloseReason::ServerError => "unexpected server error",
            CloseReason::TryAgainLater => "try again later",
            CloseReason::InvalidToken => "invalid token",
            CloseReason::TokenExpired => "token expired",
            CloseReason::TokenNotYetValid => "token not yet valid",
            CloseReason::WorkspaceMismatch => "workspace mismatch",
        }
    }

    /// The encoded close frame for this reason, built once per process.
    pub fn frame(self) -> SharedFrame {
        static FRAMES: OnceLock<Vec<SharedFrame>> = OnceLock::new();
        let frames = FRAMES.get_or_init(|| {
            CloseReason::ALL
                .iter()
                .map(|r| close_frame(r.code(), r.phrase()))
                .collect()
        });
        let idx = CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0);
        frames[idx].clone()
    }
}

/// Encodes a close frame with `code` and `reason` (the reason is cut to fit 123 bytes).
pub fn close_frame(code: u16, reason: &str) -> SharedFrame {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Close, &payload)
}

/// Whether a client may send `code` in a close frame: RFC 6455 §7.4's codes plus those IANA
/// registered since (1012 service restart, 1013 try again later, 1014 bad gateway), and the
/// 3000-4999 ranges for libraries and applications.
pub fn is_valid_received_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_contract() {
        assert_eq!(CloseReason::InvalidToken.code(), 4401);
        assert_eq!(CloseReason::TokenExpired.code(), 4401);
        assert_eq!(CloseReason::WorkspaceMismatch.code(), 4003);
        assert_eq!(CloseReason::GoingAway.code(), 1001);
        assert_eq!(CloseReason::ServerError.code(), 1011);
        assert_eq!(CloseReason::SlowConsumer.code(), 1008);
        assert_eq!(CloseReason::TryAgainLater.code(), 1013);
        assert_eq!(CloseReason::TokenExpired.phrase(), "token expired");
        assert_eq!(
            CloseReason::WorkspaceMismatch.phrase(),
            "workspace mismatch"
        );
        assert_eq!(CloseReason::InvalidToken.phrase(), "invalid token");
    }

    #[test]
    fn cached_frames_carry_code_and_phrase() {
        for r in CloseReason::ALL {
            let f = r.frame();
            assert_eq!(f[0], 0x88);
            let len = f[1] as usize;
            assert_eq!(f.len(), 2 + len);
            assert_eq!(u16::from_be_bytes([f[2], f[3]]), r.code());
            assert_eq!(&f[4..], r.phrase().as_bytes());
        }
    }

    #[test]
    fn registered_codes_are_accepted_and_the_rest_refused() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(is_valid_received_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!is_valid_received_code(bad), "{bad}");
        }
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let f = close_frame(1000, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
