//! The cluster wire format: how one event travels between nodes on Redis.
//!
//! Channel: `causeloop:v1:ws:<workspace_id>`, one per workspace, so that a node subscribes to
//! exactly the workspaces it serves (both versions use it: a node needs one subscription through
//! a rollout). Message: one JSON object. Version 1 carries the event alone,
//!
//! ```json
//! {"v":1,"type":"issue.created","ts":1764373560123,"user_id":"usr_1","payload":{"id":"iss_1"}}
//! ```
//!
//! and version 2 its position in the workspace's stream too, assigned by Redis in the function
//! that appends it to the workspace's history stream and publishes it
//! (`src/bus/cluster/causeloop.lua`):
//!
//! ```json
//! {"v":2,"epoch":1796484471511,"offset":42,"type":"issue.created","ts":1764373560123,"payload":{"id":"iss_1"}}
//! ```
//!
//! `ts` is Unix milliseconds stamped once by whoever publishes, so that every node formats the
//! same `ts` into the frame and every subscriber everywhere receives identical bytes; `user_id`
//! is present only for a user-scoped event. A backend in any language can publish either
//! version to Redis directly. A node checks a message exactly as it checks an HTTP publish (the
//! same type, id, depth, number and size rules) before building the frame, since anyone who can
//! publish to Redis can reach its subscribers.
//!
//! A workspace's keys (version 2) share its channel's hash slot ([`key_base`]), so that the
//! function touches one slot on a Redis Cluster.

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

/// What every key of `workspace_id` starts with: a hash tag that puts the keys in the
/// workspace channel's hash slot. `{H}`, where H is the part of the channel Redis hashes (the
/// whole channel, or what its first non-empty `{…}` holds), followed by the channel itself when
/// H is not the whole channel (two workspaces may share H). If H holds a `}` (it cannot be put
/// inside a tag), the first of `_0`, `_1`, `_2`, … with the same hash slot stands for it.
pub fn key_base(workspace_id: &str) -> String {
    let channel = channel(workspace_id);
    let hashed = hashed_part(&channel);
    let whole = hashed.len() == channel.len();
    let mut base = String::with_capacity(channel.len() * 2 + 2);
    base.push('{');
    if hashed.contains(&b'}') {
        let slot = crate::bus::topology::slot(&channel);
        let alias = (0u32..)
            .map(|n| format!("_{n}"))
            .find(|a| crate::bus::topology::slot(a.as_bytes()) == slot)
            .expect("every slot has a short alias");
        base.push_str(&alias);
    } else {
        base.push_str(std::str::from_utf8(hashed).expect("a part of a str between ASCII braces"));
    }
    base.push('}');
    if !whole || hashed.contains(&b'}') {
        base.push_str(std::str::from_utf8(&channel).expect("utf-8"));
    }
    base
}

/// The part of `key` Redis Cluster hashes.
fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The workspace a channel belongs to, if it is one of ours.
pub fn workspace_of(channel: &[u8]) -> Option<&str> {
    std::str::from_utf8(channel.strip_prefix(CHANNEL_PREFIX.as_bytes())?).ok()
}

/// Encodes a version 1 message. `payload` must be one JSON object (already validated and
/// minified).
pub fn encode(kind: &str, user_id: Option<&str>, ts_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(kind.len() + payload.len() + 64);
    write_message(&mut out, true, kind, user_id, ts_ms, |o| {
        o.extend_from_slice(payload)
    });
    out
}

/// The length of the message [`write_message`] writes, its payload `payload_len` bytes.
pub fn message_len(
    v1: bool,
    kind: &str,
    user_id: Option<&str>,
    ts_ms: u64,
    payload_len: usize,
) -> usize {
    use crate::json::string_len;
    // {"v":1,"type":K,"ts":N[,"user_id":U],"payload":P}
    (if v1 { 14 } else { 8 })
        + string_len(kind)
        + 6
        + digits(ts_ms as usize)
        + user_id.map_or(0, |u| 11 + string_len(u))
        + 11
        + payload_len
        + 1
}

/// Writes a message whose payload `write_payload` writes (one JSON object, minified): a version
/// 1 message (`v1`), or the event a version 2 publish hands the function (no `v`: the function
/// adds it with the position).
pub fn write_message(
    out: &mut Vec<u8>,
    v1: bool,
    kind: &str,
    user_id: Option<&str>,
    ts_ms: u64,
    write_payload: impl FnOnce(&mut Vec<u8>),
) {
    use std::io::Write;
    out.extend_from_slice(if v1 {
        b"{\"v\":1,\"type\":".as_slice()
    } else {
        b"{\"type\":".as_slice()
    });
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

/// How a version 2 publish calls the function.
#[derive(Clone, Copy, Debug)]
pub struct V2Call {
    /// `causeloop_publish`, or `causeloop_spublish` on a Redis Cluster.
    pub function: &'static [u8],
    /// `--history-size`.
    pub size: usize,
    /// `--history-ttl`, in milliseconds.
    pub ttl_ms: u64,
}

/// One message to publish, as the Redis command that carries it is built from it.
#[derive(Clone, Copy, Debug)]
pub struct Publish<'a> {
    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster (version 1).
    pub command: &'a [u8],
    /// Set for a version 2 publish: the function call instead of `command`.
    pub v2: Option<V2Call>,
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

/// The length of a RESP bulk string of `n` bytes.
fn bulk_len(n: usize) -> usize {
    1 + digits(n) + 2 + n + 2
}

impl Publish<'_> {
    /// The length of the command [`Publish::write`] appends, so that a buffer can be sized for
    /// it before anything is written (no reallocation, so the payload is copied once).
    pub fn command_len(&self) -> usize {
        let len = message_len(
            self.v2.is_none(),
            self.kind,
            self.user_id,
            self.ts_ms,
            self.payload_len,
        );
        let channel = CHANNEL_PREFIX.len() + self.workspace_id.len();
        match self.v2 {
            // *3 command channel message
            None => 4 + bulk_len(self.command.len()) + bulk_len(channel) + bulk_len(len),
            // *9 FCALL function 2 meta history channel size ttl event
            Some(c) => {
                let base = key_base(self.workspace_id).len();
                4 + bulk_len(5)
                    + bulk_len(c.function.len())
                    + bulk_len(1)
                    + bulk_len(base + META_SUFFIX.len())
                    + bulk_len(base + HISTORY_SUFFIX.len())
                    + bulk_len(channel)
                    + bulk_len(digits(c.size))
                    + bulk_len(digits(c.ttl_ms as usize))
                    + bulk_len(len)
            }
        }
    }

    /// Appends the Redis command that publishes the message. Version 1: `PUBLISH` (`SPUBLISH`),
    /// the workspace's channel, the message. Version 2: `FCALL` of the function with the
    /// workspace's keys, its channel, the history bounds and the event. The payload is written
    /// once, by `write_payload`, straight into the command (its length is known before it is
    /// written).
    pub fn write(&self, out: &mut Vec<u8>, write_payload: impl FnOnce(&mut Vec<u8>)) {
        use std::io::Write;
        let v1 = self.v2.is_none();
        let len = message_len(v1, self.kind, self.user_id, self.ts_ms, self.payload_len);
        let at = out.len();
        let channel_len = CHANNEL_PREFIX.len() + self.workspace_id.len();
        match self.v2 {
            None => {
                let _ = write!(out, "*3\r\n${}\r\n", self.command.len());
                out.extend_from_slice(self.command);
                out.extend_from_slice(b"\r\n");
            }
            Some(c) => {
                let base = key_base(self.workspace_id);
                let _ = write!(out, "*9\r\n$5\r\nFCALL\r\n${}\r\n", c.function.len());
                out.extend_from_slice(c.function);
                let _ = write!(
                    out,
                    "\r\n$1\r\n2\r\n${}\r\n{base}{META_SUFFIX}\r\n${}\r\n{base}{HISTORY_SUFFIX}\r\n",
                    base.len() + META_SUFFIX.len(),
                    base.len() + HISTORY_SUFFIX.len(),
                );
            }
        }
        let _ = write!(
            out,
            "${channel_len}\r\n{CHANNEL_PREFIX}{}\r\n",
            self.workspace_id
        );
        if let Some(c) = self.v2 {
            let (size, ttl) = (c.size.to_string(), c.ttl_ms.to_string());
            let _ = write!(
                out,
                "${}\r\n{size}\r\n${}\r\n{ttl}\r\n",
                size.len(),
                ttl.len()
            );
        }
        let _ = write!(out, "${len}\r\n");
        let start = out.len();
        write_message(out, v1, self.kind, self.user_id, self.ts_ms, write_payload);
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

/// What follows a workspace's [`key_base`] in the keys of its resume records (version 2): a
/// list per token, named by the hex of the SHA-256 of the token, a zero byte and the workspace.
pub const RESUME_INFIX: &str = ":resume:";

/// The key of the resume records of `key` (the token's hash) in `workspace_id`.
pub fn record_key(workspace_id: &str, key: &[u8; 32]) -> String {
    use std::fmt::Write;
    let mut k = format!("{}{RESUME_INFIX}", key_base(workspace_id));
    for b in key {
        let _ = write!(k, "{b:02x}");
    }
    k
}

/// A workspace's stream state (version 2): a hash with `epoch` and `offset`.
pub const META_SUFFIX: &str = ":meta";
/// A workspace's history (version 2): a stream, entry `<offset>-0` holding the message (`m`)
/// and Redis's time when it was added (`t`).
pub const HISTORY_SUFFIX: &str = ":history";

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
    /// Its position, for a version 2 message.
    pub pos: Option<crate::history::Position>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message<'a> {
    v: u32,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    offset: Option<u64>,
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
    let pos = match (m.v, m.epoch, m.offset) {
        (1, None, None) => None,
        (1, _, _) => return Err("a version 1 message carries no epoch or offset".into()),
        (2, Some(epoch), Some(offset)) if epoch > 0 && offset > 0 => {
            Some(crate::history::Position { epoch, offset })
        }
        (2, _, _) => {
            return Err("a version 2 message needs an epoch and an offset, both above 0".into())
        }
        (v, _, _) => return Err(format!("wire format version {v} (this node reads 1 and 2)")),
    };
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
        pos,
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
                v2: None,
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
            assert_eq!(message_len(true, "a.b", user, ts, payload.len()), msg.len());
        }
    }

    #[test]
    fn a_version_2_publish_calls_the_function_with_the_workspace_keys() {
        let payload = br#"{"id":"iss_1"}"#;
        for (ws, user) in [("ws_1", None), ("a{b}c", Some("u\"1")), ("x}y", None)] {
            let p = Publish {
                command: b"SPUBLISH",
                v2: Some(V2Call {
                    function: b"causeloop_spublish",
                    size: 1000,
                    ttl_ms: 120_000,
                }),
                workspace_id: ws,
                kind: "a.b",
                user_id: user,
                ts_ms: 17,
                payload_len: payload.len(),
            };
            let mut cmd = Vec::new();
            p.write(&mut cmd, |o| o.extend_from_slice(payload));
            assert_eq!(cmd.len(), p.command_len());
            let base = key_base(ws);
            let event = {
                let mut e = Vec::new();
                write_message(&mut e, false, "a.b", user, 17, |o| {
                    o.extend_from_slice(payload)
                });
                e
            };
            let mut want = Vec::new();
            crate::bus::resp::command(
                &mut want,
                &[
                    b"FCALL",
                    b"causeloop_spublish",
                    b"2",
                    format!("{base}:meta").as_bytes(),
                    format!("{base}:history").as_bytes(),
                    &channel(ws),
                    b"1000",
                    b"120000",
                    &event,
                ],
            );
            assert_eq!(cmd, want);
            // What the function publishes decodes to the frame a version 1 message builds.
            let v2 = format!(
                r#"{{"v":2,"epoch":9,"offset":3,{}"#,
                std::str::from_utf8(&event[1..]).unwrap()
            );
            let got = decode(v2.as_bytes(), LIMITS).unwrap();
            let v1 = decode(&encode("a.b", user, 17, payload), LIMITS).unwrap();
            assert_eq!(got.frame, v1.frame);
            assert_eq!(
                got.pos,
                Some(crate::history::Position {
                    epoch: 9,
                    offset: 3
                })
            );
            assert_eq!(v1.pos, None);
        }
    }

    #[test]
    fn every_key_of_a_workspace_is_in_its_channel_slot() {
        use crate::bus::topology::slot;
        assert_eq!(key_base("ws_1"), "{causeloop:v1:ws:ws_1}");
        assert_eq!(key_base("a{b}c"), "{b}causeloop:v1:ws:a{b}c");
        for ws in [
            "ws_1", "a{b}c", "x}y", "{}", "}{", "{a", "a}", "é{x}", "{{}}",
        ] {
            let base = key_base(ws);
            let want = slot(&channel(ws));
            for suffix in [META_SUFFIX, HISTORY_SUFFIX, ":resume:00ff"] {
                let key = format!("{base}{suffix}");
                assert_eq!(slot(key.as_bytes()), want, "{ws:?}: {key:?}");
            }
        }
        // Workspaces sharing a tag keep apart keys.
        assert_ne!(key_base("a{b}"), key_base("c{b}"));
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
        assert!(bad(r#"{"v":3,"type":"a","ts":1,"payload":{}}"#).contains("version 3"));
        assert!(bad(r#"{"v":2,"type":"a","ts":1,"payload":{}}"#).contains("epoch"));
        assert!(
            bad(r#"{"v":2,"epoch":0,"offset":1,"type":"a","ts":1,"payload":{}}"#)
                .contains("above 0")
        );
        assert!(
            bad(r#"{"v":1,"epoch":1,"offset":1,"type":"a","ts":1,"payload":{}}"#)
                .contains("version 1")
        );
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
