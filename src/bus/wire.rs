//! The cluster wire format, version 1: how one event travels between nodes on Redis.
//!
//! Channel: `causeloop:v1:ws:<workspace_id>`, one per workspace, so that a node subscribes to
//! exactly the workspaces it serves. Message: one JSON object,
//!
//! ```json
//! {"v":1,"type":"issue.created","ts":1764373560123,"user_id":"usr_1","payload":{"id":"iss_1"}}
//! ```
//!
//! `ts` is Unix milliseconds stamped once by whoever publishes, so that every node formats the
//! same `ts` into the frame and every subscriber everywhere receives identical bytes; `user_id`
//! is present only for a user-scoped event. A backend in any language can `PUBLISH` this to
//! Redis directly. A node checks a message exactly as it checks an HTTP publish (the same type,
//! id, depth, number and size rules) before building the frame, since anyone who can publish to
//! Redis can reach its subscribers.

use crate::event::{check_id, check_type, encode_with, EventError};
use crate::ws::SharedFrame;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Every channel name starts with this; what follows is the workspace id.
pub const CHANNEL_PREFIX: &str = "causeloop:v1:ws:";

/// The channel of `workspace_id`.
pub fn channel(workspace_id: &str) -> Vec<u8> {
    let mut c = Vec::with_capacity(CHANNEL_PREFIX.len() + workspace_id.len());
    c.extend_from_slice(CHANNEL_PREFIX.as_bytes());
    c.extend_from_slice(workspace_id.as_bytes());
    c
}

/// The workspace a channel belongs to, if it is one of ours.
pub fn workspace_of(channel: &[u8]) -> Option<&str> {
    std::str::from_utf8(channel.strip_prefix(CHANNEL_PREFIX.as_bytes())?).ok()
}

/// Encodes a message. `payload` must be one JSON object (already validated and minified).
pub fn encode(kind: &str, user_id: Option<&str>, ts_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(kind.len() + payload.len() + 64);
    write_message(&mut out, kind, user_id, ts_ms, |o| {
        o.extend_from_slice(payload)
    });
    out
}

/// The length of the message [`write_message`] writes, its payload `payload_len` bytes.
pub fn message_len(kind: &str, user_id: Option<&str>, ts_ms: u64, payload_len: usize) -> usize {
    use crate::json::string_len;
    // {"v":1,"type":K,"ts":N[,"user_id":U],"payload":P}
    14 + string_len(kind)
        + 6
        + digits(ts_ms as usize)
        + user_id.map_or(0, |u| 11 + string_len(u))
        + 11
        + payload_len
        + 1
}

/// Writes a message whose payload `write_payload` writes (one JSON object, minified).
pub fn write_message(
    out: &mut Vec<u8>,
    kind: &str,
    user_id: Option<&str>,
    ts_ms: u64,
    write_payload: impl FnOnce(&mut Vec<u8>),
) {
    use std::io::Write;
    out.extend_from_slice(b"{\"v\":1,\"type\":");
    crate::json::write_string(out, kind);
    out.extend_from_slice(b",\"ts\":");
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{ts_ms}");
    if let Some(u) = user_id {
        out.extend_from_slice(b",\"user_id\":");
        crate::json::write_string(out, u);
    }
    out.extend_from_slice(b",\"payload\":");
    write_payload(out);
    out.push(b'}');
}

/// The number of decimal digits of `n`.
fn digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// One message to publish, as the Redis command that carries it is built from it.
#[derive(Clone, Copy, Debug)]
pub struct Publish<'a> {
    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster.
    pub command: &'a [u8],
    /// The workspace (its channel is named after it).
    pub workspace_id: &'a str,
    /// The event's type.
    pub kind: &'a str,
    /// The user, for a user-scoped event.
    pub user_id: Option<&'a str>,
    /// The event's `ts`, Unix milliseconds.
    pub ts_ms: u64,
    /// The minified payload's length.
    pub payload_len: usize,
}

impl Publish<'_> {
    /// The length of the command [`Publish::write`] appends, so that a buffer can be sized for
    /// it before anything is written (no reallocation, so the payload is copied once).
    pub fn command_len(&self) -> usize {
        let len = message_len(self.kind, self.user_id, self.ts_ms, self.payload_len);
        let channel = CHANNEL_PREFIX.len() + self.workspace_id.len();
        // *3\r\n $N\r\n command \r\n $N\r\n channel \r\n $N\r\n message \r\n
        4 + (1 + digits(self.command.len()) + 2 + self.command.len() + 2)
            + (1 + digits(channel) + 2 + channel + 2)
            + (1 + digits(len) + 2 + len + 2)
    }

    /// Appends the Redis command that publishes the message: `*3`, the command, the
    /// workspace's channel, the message. The payload is written once, by `write_payload`,
    /// straight into the command (its length is known before it is written).
    pub fn write(&self, out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
        use std::io::Write;
        let len = message_len(self.kind, self.user_id, self.ts_ms, self.payload_len);
        let at = out.len();
        let _ = write!(out, "*3\r\n${}\r\n", self.command.len());
        out.extend_from_slice(self.command);
        let _ = write!(
            out,
            "\r\n${}\r\n{CHANNEL_PREFIX}{}\r\n${len}\r\n",
            CHANNEL_PREFIX.len() + self.workspace_id.len(),
            self.workspace_id
        );
        let start = out.len();
        write_message(out, self.kind, self.user_id, self.ts_ms, write_payload);
        debug_assert_eq!(
            out.len() - start,
            len,
            "message_len disagrees with write_message"
        );
        out.extend_from_slice(b"\r\n");
        debug_assert_eq!(
            out.len() - at,
            self.command_len(),
            "command_len disagrees with write"
        );
    }
}

/// The rules a received message is held to (the node's own publish limits).
#[derive(Clone, Copy, Debug)]
pub struct WireLimits {
    /// `--max-event-bytes`, for the frame built from the message.
    pub max_event_bytes: usize,
    /// `--max-json-depth`, for the payload.
    pub max_depth: usize,
    /// `--max-id-bytes`.
    pub max_id_bytes: usize,
}

/// A received message, ready for the shards.
#[derive(Debug)]
pub struct Received {
    /// Set for a user-scoped event.
    pub user_id: Option<Box<str>>,
    /// The frame, built once on this node.
    pub frame: SharedFrame,
    /// The publisher's `ts`, Unix milliseconds.
    pub ts_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message<'a> {
    v: u32,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    ts: u64,
    #[serde(default, borrow, deserialize_with = "super::body::present_string")]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// The latest `ts` accepted: 9999-12-31T23:59:59.999Z, the last instant the frame's `ts` format
/// can express.
const MAX_TS_MS: u64 = 253_402_300_799_999;

/// Checks a message and builds its frame. The error says why, for the bus's log and metrics.
pub fn decode(message: &[u8], limits: WireLimits) -> Result<Received, String> {
    if crate::json::max_depth(message) > limits.max_depth + 1 {
        return Err(EventError::TooDeep(limits.max_depth).to_string());
    }
    let m: Message<'_> = serde_json::from_slice(message).map_err(|e| e.to_string())?;
    if m.v != 1 {
        return Err(format!("wire format version {} (this node reads 1)", m.v));
    }
    check_type(&m.kind).map_err(|e| e.to_string())?;
    if let Some(u) = &m.user_id {
        check_id(u, "user_id", limits.max_id_bytes).map_err(|e| e.to_string())?;
    }
    if m.ts > MAX_TS_MS {
        return Err(format!("ts {} is not Unix milliseconds", m.ts));
    }
    let payload = m.payload.get().as_bytes();
    if !payload.starts_with(b"{") {
        return Err(EventError::PayloadNotObject.to_string());
    }
    if crate::json::max_depth(payload) > limits.max_depth {
        return Err(EventError::TooDeep(limits.max_depth).to_string());
    }
    crate::json::portable(payload).map_err(|e| EventError::NotPortable(e).to_string())?;
    crate::json::unique_keys(payload).map_err(|e| EventError::DuplicateKey(e).to_string())?;
    let frame = encode_with(&m.kind, payload.len(), m.ts, |buf| {
        crate::json::minify_into(buf, payload)
    });
    if frame.len() > limits.max_event_bytes {
        return Err(EventError::TooLarge(frame.len(), limits.max_event_bytes).to_string());
    }
    Ok(Received {
        user_id: m.user_id.map(|u| u.into()),
        frame,
        ts_ms: m.ts,
    })
}

/// The workspace id rule for a channel's workspace (the same as for a publish).
pub fn check_workspace(workspace_id: &str, max_id_bytes: usize) -> Result<(), String> {
    check_id(workspace_id, "workspace_id", max_id_bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WireLimits = WireLimits {
        max_event_bytes: 64 << 10,
        max_depth: 32,
        max_id_bytes: 256,
    };

    #[test]
    fn a_message_builds_the_frame_a_local_publish_would() {
        let payload = br#"{"id":"iss_1","n":[1,2]}"#;
        let msg = encode("issue.created", Some("usr_1"), 1_764_373_560_123, payload);
        assert_eq!(
            msg,
            br#"{"v":1,"type":"issue.created","ts":1764373560123,"user_id":"usr_1","payload":{"id":"iss_1","n":[1,2]}}"#
        );
        let got = decode(&msg, LIMITS).unwrap();
        let local = encode_with("issue.created", payload.len(), 1_764_373_560_123, |b| {
            b.extend_from_slice(payload)
        });
        assert_eq!(got.frame, local);
        assert_eq!(got.user_id.as_deref(), Some("usr_1"));
        // Whitespace from a hand-written publisher is minified the same way as HTTP bodies.
        let spaced = br#"{ "v": 1, "type": "issue.created", "ts": 1764373560123, "payload": { "id": "iss_1", "n": [1, 2] } }"#;
        assert_eq!(decode(spaced, LIMITS).unwrap().frame, local);
    }

    #[test]
    fn a_publish_command_is_the_message_in_a_resp_array() {
        let payload = br#"{"id":"iss_1","t":"tab\tq\"\u0001"}"#;
        for (user, ts) in [
            (None, 0u64),
            (Some("usr_\"1\n"), 9),
            (Some("u"), 1_764_373_560_123),
        ] {
            let mut cmd = Vec::new();
            let p = Publish {
                command: b"SPUBLISH",
                workspace_id: "ws_1",
                kind: "a.b",
                user_id: user,
                ts_ms: ts,
                payload_len: payload.len(),
            };
            p.write(&mut cmd, |o| o.extend_from_slice(payload));
            assert_eq!(cmd.len(), p.command_len());
            let mut want = Vec::new();
            let msg = encode("a.b", user, ts, payload);
            crate::bus::resp::command(&mut want, &[b"SPUBLISH", b"causeloop:v1:ws:ws_1", &msg]);
            assert_eq!(cmd, want);
            assert_eq!(message_len("a.b", user, ts, payload.len()), msg.len());
        }
    }

    #[test]
    fn channels_name_their_workspace() {
        assert_eq!(channel("ws_1"), b"causeloop:v1:ws:ws_1");
        assert_eq!(workspace_of(b"causeloop:v1:ws:ws_1"), Some("ws_1"));
        assert_eq!(workspace_of(b"other:ws_1"), None);
    }

    #[test]
    fn messages_are_held_to_the_publish_rules() {
        let bad = |m: &str| decode(m.as_bytes(), LIMITS).unwrap_err();
        assert!(bad(r#"{"v":2,"type":"a","ts":1,"payload":{}}"#).contains("version 2"));
        assert!(bad(r#"{"v":1,"type":"heartbeat","ts":1,"payload":{}}"#).contains("type"));
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"payload":[1]}"#).contains("object"));
        assert!(bad(r#"{"v":1,"type":"a","payload":{}}"#).contains("missing field `ts`"));
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"payload":{"x":1e999}}"#).contains("double"));
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"user_id":"","payload":{}}"#).contains("user_id"));
        assert!(
            bad(r#"{"v":1,"type":"a","ts":1,"user_id":null,"payload":{}}"#).contains("user_id")
        );
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"payload":{"k":1,"k":2}}"#).contains("duplicate"));
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"ts":2,"payload":{}}"#).contains("duplicate"));
        assert!(bad(r#"{"v":1,"type":"stream.gap","ts":1,"payload":{}}"#).contains("reserved"));
        assert!(bad(r#"{"v":1,"type":"a","ts":1,"payload":{},"x":1}"#).contains("unknown field"));
        assert!(bad(r#"{"v":1,"type":"a","ts":999999999999999999,"payload":{}}"#).contains("ts"));
        let big = format!(
            r#"{{"v":1,"type":"a","ts":1,"payload":{{"p":"{}"}}}}"#,
            "x".repeat(70_000)
        );
        assert!(bad(&big).contains("--max-event-bytes"));
        let deep = format!(
            r#"{{"v":1,"type":"a","ts":1,"payload":{}1{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(bad(&deep).contains("nested"));
    }
}
