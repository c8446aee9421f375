//! An event ready for fan-out: its addressing and its frame, encoded exactly once.
//!
//! The frame is `{"type":T,"payload":P,"ts":TS}` with the keys in that order and no whitespace,
//! behind a final text-frame header. `ts` is stamped here, once, so every subscriber of one event
//! receives identical bytes.

use crate::clock;
use crate::history::Position;
use crate::ws::frame::{encode_text_into, encode_text_with};
use crate::ws::SharedFrame;
use std::time::Instant;

/// Longest event type accepted.
pub const MAX_TYPE_BYTES: usize = 128;

/// One event on its way to subscribers.
#[derive(Clone, Debug)]
pub struct Event {
    /// The workspace whose connections receive it.
    pub workspace_id: Box<str>,
    /// When set, only this user's connections in the workspace receive it.
    pub user_id: Option<Box<str>>,
    /// The encoded frame, shared by every recipient.
    pub frame: SharedFrame,
    /// When the publish was accepted (for fan-out latency).
    pub accepted_at: Instant,
    /// Its `ts`, Unix milliseconds.
    pub ts_ms: u64,
    /// Its position in the workspace's stream ([`Position::default`] without history).
    pub pos: Position,
    /// Its frame compressed (`permessage-deflate`), made once, by the first shard that has a
    /// recipient which negotiated it; `None` inside when compressing would not pay. The history
    /// keeps the same cell, so a replay sends the same compressed bytes.
    pub deflated: Deflated,
}

/// An event frame's compressed form, made at most once and shared.
pub type Deflated = std::sync::Arc<std::sync::OnceLock<Option<SharedFrame>>>;

/// Why an event's fields are unacceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventError {
    /// `type` does not match `^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$`, is too long, or is reserved
    /// (`connected`, `heartbeat`, and `stream.*`, which the server itself sends).
    Type(String),
    /// An id is empty, longer than the limit (given), or contains control characters; the
    /// field is named.
    Id(&'static str, usize),
    /// The encoded event is larger than `--max-event-bytes`: (its size, the limit).
    TooLarge(usize, usize),
    /// The payload nests deeper than `--max-json-depth` (the limit).
    TooDeep(usize),
    /// The payload would not read the same in every JSON parser (a number beyond the double
    /// range, an unpaired surrogate escape).
    NotPortable(crate::json::NotPortable),
    /// An object in the payload has the same key twice.
    DuplicateKey(crate::json::DuplicateKey),
    /// The payload is not a JSON object.
    PayloadNotObject,
    /// The payload could not be serialized (library callers only).
    Serialize(String),
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventError::Type(t) => write!(f, "type {t:?} is not a valid event type (lowercase dotted name; connected, heartbeat and stream.* are reserved for the server)"),
            EventError::Id(field, max) => write!(f, "{field} must be 1 to {max} bytes without control characters"),
            EventError::TooLarge(size, max) => write!(f, "event is {size} bytes encoded, over the limit of {max} bytes (--max-event-bytes)"),
            EventError::TooDeep(max) => write!(f, "payload nested deeper than {max} levels (--max-json-depth)"),
            EventError::NotPortable(crate::json::NotPortable::NumberOutOfRange) => f.write_str("payload has a number outside the IEEE 754 double range"),
            EventError::NotPortable(crate::json::NotPortable::LoneSurrogate) => f.write_str("payload has a \\u escape of half a surrogate pair"),
            EventError::DuplicateKey(k) => write!(f, "payload has a {k} (each key may appear once per object)"),
            EventError::PayloadNotObject => f.write_str("payload must be a JSON object"),
            EventError::Serialize(e) => write!(f, "payload could not be serialized: {e}"),
        }
    }
}

impl std::error::Error for EventError {}

/// Types the server itself sends and no publisher may: `connected`, `heartbeat`, and anything
/// under `stream.` (`stream.gap`, and whatever the stream's own signals become).
pub fn is_reserved_type(t: &str) -> bool {
    t == "connected" || t == "heartbeat" || t.starts_with("stream.")
}

/// Checks an event type against the contract's pattern and reserved names.
pub fn check_type(t: &str) -> Result<(), EventError> {
    let bad = || EventError::Type(t.chars().take(MAX_TYPE_BYTES).collect());
    if t.len() > MAX_TYPE_BYTES || is_reserved_type(t) {
        return Err(bad());
    }
    for segment in t.split('.') {
        let mut bytes = segment.bytes();
        match bytes.next() {
            Some(b'a'..=b'z') => {}
            _ => return Err(bad()),
        }
        if !bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Checks a workspace or user id: 1 to `max` bytes, no control characters.
pub fn check_id(id: &str, field: &'static str, max: usize) -> Result<(), EventError> {
    if !id_ok(id, max) {
        return Err(EventError::Id(field, max));
    }
    Ok(())
}

/// Whether `id` is 1 to `max` bytes without control characters (the rule for every id, from a
/// publish or from a token).
pub fn id_ok(id: &str, max: usize) -> bool {
    !id.is_empty() && id.len() <= max && !id.chars().any(char::is_control)
}

/// The length of the frame [`encode_with`] builds for an event of `kind` whose minified payload
/// is `payload_len` bytes, without building it. (`kind` has passed [`check_type`], so it needs no
/// escaping.)
pub fn frame_len(kind: &str, payload_len: usize) -> usize {
    let body = body_len(kind, payload_len);
    crate::ws::frame::header_len(body) + body
}

/// The length of `{"type":"<kind>","payload":<payload>,"ts":"<24 characters>"}` for a `kind`
/// that needs no escaping.
fn body_len(kind: &str, payload_len: usize) -> usize {
    9 + kind.len() + 12 + payload_len + 7 + 24 + 2
}

/// Encodes an event frame whose payload is written by `write_payload` (which must write exactly
/// one JSON object). `ts_ms` is the Unix time in milliseconds to stamp.
pub fn encode_with(
    kind: &str,
    payload_len_hint: usize,
    ts_ms: u64,
    write_payload: impl FnOnce(&mut Vec<u8>),
) -> SharedFrame {
    let ts = clock::format_ts(ts_ms);
    // Sized exactly (for a kind without escapes and a payload of the length hinted), so the
    // payload is written into its final buffer with no reallocation, hence no second copy.
    encode_text_with(body_len(kind, payload_len_hint), |buf| {
        envelope(buf, kind, &ts, write_payload)
    })
}

/// Writes `{"type":T,"payload":<write_payload>,"ts":TS}` into `buf`.
fn envelope(buf: &mut Vec<u8>, kind: &str, ts: &[u8], write_payload: impl FnOnce(&mut Vec<u8>)) {
    buf.extend_from_slice(b"{\"type\":");
    crate::json::write_string(buf, kind);
    buf.extend_from_slice(b",\"payload\":");
    write_payload(buf);
    buf.extend_from_slice(b",\"ts\":\"");
    buf.extend_from_slice(ts);
    buf.extend_from_slice(b"\"}");
}

fn connected_payload(buf: &mut Vec<u8>, workspace_id: &str, user_id: &str) {
    buf.extend_from_slice(b"{\"workspace_id\":");
    crate::json::write_string(buf, workspace_id);
    buf.extend_from_slice(b",\"user_id\":");
    crate::json::write_string(buf, user_id);
    buf.push(b'}');
}

/// The `connected` frame for one connection.
pub fn connected_frame(workspace_id: &str, user_id: &str, ts_ms: u64) -> SharedFrame {
    encode_with(
        "connected",
        workspace_id.len() + user_id.len() + 32,
        ts_ms,
        |buf| connected_payload(buf, workspace_id, user_id),
    )
}

/// Appends the `connected` frame for one connection to `out` (after its 101 response).
pub fn connected_frame_into(out: &mut Vec<u8>, workspace_id: &str, user_id: &str, ts_ms: u64) {
    let ts = clock::format_ts(ts_ms);
    encode_text_into(out, |buf| {
        envelope(buf, "connected", &ts, |b| {
            connected_payload(b, workspace_id, user_id)
        })
    });
}

/// Why a connection is told it missed events (`stream.gap`'s `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The history was cut by its bounds (`--history-size`, `--history-ttl`,
    /// `--history-max-bytes`).
    HistoryTrimmed,
    /// The history behind the connection's position is gone (another epoch: a restart, or a
    /// stream dropped).
    HistoryLost,
}

impl GapReason {
    /// The `reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::HistoryTrimmed => "history_trimmed",
            GapReason::HistoryLost => "history_lost",
        }
    }
}

/// The `stream.gap` frame: `{"reason":R,"since":TS|null}`, `since` being the `ts` of the last
/// event the connection had, when known.
pub fn gap_frame(reason: GapReason, since_ms: Option<u64>, ts_ms: u64) -> SharedFrame {
    encode_with("stream.gap", 64, ts_ms, |buf| {
        buf.extend_from_slice(b"{\"reason\":\"");
        buf.extend_from_slice(reason.as_str().as_bytes());
        buf.extend_from_slice(b"\",\"since\":");
        match since_ms {
            Some(ms) => {
                buf.push(b'"');
                buf.extend_from_slice(&clock::format_ts(ms));
                buf.push(b'"');
            }
            None => buf.extend_from_slice(b"null"),
        }
        buf.push(b'}');
    })
}

/// Whether `frame` is a published event's frame (a text frame whose type is not one the server
/// itself sends, or a compressed text frame: only event frames are compressed), as opposed to
/// `connected`, `heartbeat`, `stream.*` and control frames.
pub fn is_event_frame(frame: &[u8]) -> bool {
    if frame.first() == Some(&(0x81 | crate::ws::deflate::RSV1)) {
        return true;
    }
    if frame.first() != Some(&0x81) || frame.len() < 2 {
        return false;
    }
    let body = &frame[crate::ws::frame::header_len_of(frame)..];
    let Some(rest) = body.strip_prefix(b"{\"type\":\"") else {
        return false;
    };
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).is_ok_and(|t| !is_reserved_type(t))
}

/// The `heartbeat` frame for one tick.
pub fn heartbeat_frame(ts_ms: u64) -> SharedFrame {
    encode_with("heartbeat", 11, ts_ms, |buf| {
        buf.extend_from_slice(b"{\"ok\":true}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &SharedFrame) -> &str {
        // Short frames: 2-byte header.
        std::str::from_utf8(&frame[crate::ws::frame::header_len(frame.len() - 2)..]).unwrap()
    }

    #[test]
    fn connected_bytes_are_exact() {
        let f = connected_frame("ws_01abc123", "usr_01abc456", 1_705_312_800_000);
        assert_eq!(
            text(&f),
            r#"{"type":"connected","payload":{"workspace_id":"ws_01abc123","user_id":"usr_01abc456"},"ts":"2024-01-15T10:00:00.000Z"}"#
        );
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1] as usize, f.len() - 2);
    }

    #[test]
    fn connected_after_a_101_is_the_same_frame() {
        let mut out = b"HTTP/1.1 101\r\n\r\n".to_vec();
        let head = out.len();
        connected_frame_into(&mut out, "ws_\"1", "usr_1", 1_705_312_800_000);
        assert_eq!(
            &out[head..],
            &connected_frame("ws_\"1", "usr_1", 1_705_312_800_000)[..]
        );
    }

    #[test]
    fn frame_len_is_the_built_length() {
        for (kind, payload) in [
            ("a", "{}".to_string()),
            (
                "issue.created",
                format!("{{\"p\":\"{}\"}}", "x".repeat(300)),
            ),
            ("b", format!("{{\"p\":\"{}\"}}", "x".repeat(70_000))),
        ] {
            let f = encode_with(kind, payload.len(), 1_705_312_800_000, |b| {
                b.extend_from_slice(payload.as_bytes())
            });
            assert_eq!(frame_len(kind, payload.len()), f.len(), "{kind}");
            // Written into a buffer sized for it: nothing was reallocated (and so copied
            // again); the only room left is the header's unused bytes.
            assert!(
                f.capacity() - f.len() < crate::ws::frame::MAX_HEADER_LEN,
                "{kind}: {} bytes of capacity for a {}-byte frame",
                f.capacity(),
                f.len()
            );
        }
    }

    #[test]
    fn gap_bytes_are_exact() {
        let f = gap_frame(
            GapReason::HistoryTrimmed,
            Some(1_705_312_800_000),
            1_705_312_805_000,
        );
        assert_eq!(
            text(&f),
            r#"{"type":"stream.gap","payload":{"reason":"history_trimmed","since":"2024-01-15T10:00:00.000Z"},"ts":"2024-01-15T10:00:05.000Z"}"#
        );
        let f = gap_frame(GapReason::HistoryLost, None, 1_705_312_805_000);
        assert_eq!(
            text(&f),
            r#"{"type":"stream.gap","payload":{"reason":"history_lost","since":null},"ts":"2024-01-15T10:00:05.000Z"}"#
        );
        assert!(!is_event_frame(&f));
    }

    #[test]
    fn event_frames_are_told_from_the_servers_own() {
        let e = encode_with("issue.created", 2, 0, |b| b.extend_from_slice(b"{}"));
        assert!(is_event_frame(&e));
        let big = encode_with("a", 300, 0, |b| {
            b.extend_from_slice(format!("{{\"p\":\"{}\"}}", "x".repeat(300)).as_bytes())
        });
        assert!(is_event_frame(&big));
        assert!(!is_event_frame(&heartbeat_frame(0)));
        assert!(!is_event_frame(&connected_frame("w", "u", 0)));
        assert!(!is_event_frame(&crate::ws::frame::ping_frame()));
        assert!(!is_event_frame(b""));
        let compressed = crate::ws::deflate::Deflater::default()
            .compress_frame(&big, 1)
            .expect("compressible");
        assert!(is_event_frame(&compressed));
    }

    #[test]
    fn heartbeat_bytes_are_exact() {
        let f = heartbeat_frame(1_705_312_805_000);
        assert_eq!(
            text(&f),
            r#"{"type":"heartbeat","payload":{"ok":true},"ts":"2024-01-15T10:00:05.000Z"}"#
        );
    }

    #[test]
    fn type_pattern() {
        for ok in [
            "issue.created",
            "issue.status.changed",
            "a",
            "job_2.updated_x",
            "stream",
            "streams.gap",
            "upstream.gap",
        ] {
            assert!(check_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Issue.created",
            "issue..created",
            ".a",
            "a.",
            "1a",
            "a-b",
            "connected",
            "heartbeat",
            "stream.gap",
            "stream.anything.else",
            "a.B",
            "é",
        ] {
            assert!(check_type(bad).is_err(), "{bad}");
        }
        assert!(check_type(&"a".repeat(MAX_TYPE_BYTES + 1)).is_err());
    }

    #[test]
    fn ids() {
        assert!(check_id("ws_1", "workspace_id", 256).is_ok());
        assert!(check_id("", "workspace_id", 256).is_err());
        assert!(check_id("a\nb", "user_id", 256).is_err());
        assert!(check_id(&"x".repeat(256), "user_id", 256).is_ok());
        assert_eq!(
            check_id(&"x".repeat(257), "user_id", 256),
            Err(EventError::Id("user_id", 256))
        );
    }
}
