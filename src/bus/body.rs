//! Validation of `POST /v1/publish` bodies.
//!
//! A body is one event object or an array of them. The whole body is validated before anything
//! is published; the first bad item is named with its index and the reason. The payload's bytes
//! are kept as the publisher wrote them (key order included), minus insignificant whitespace.
//!
//! serde_json is used here rather than simd-json because it can hand back the payload as the raw
//! text it was (`RawValue`), which is what lets the payload reach subscribers unreordered.

use crate::event::{check_id, check_type, EventError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The bounds a body is checked against (from the configuration).
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// `--max-publish-events`.
    pub max_items: usize,
    /// `--max-json-depth`, for each payload.
    pub max_depth: usize,
    /// `--max-id-bytes`.
    pub max_id_bytes: usize,
}

impl BodyLimits {
    /// The limits of a configuration.
    pub fn of(c: &crate::config::Config) -> BodyLimits {
        BodyLimits {
            max_items: c.max_publish_events,
            max_depth: c.max_json_depth,
            max_id_bytes: c.max_id_bytes,
        }
    }
}

impl Default for BodyLimits {
    fn default() -> Self {
        // The defaults are built once: `Config::default` asks the OS for the core count.
        BodyLimits::of(crate::config::defaults())
    }
}

/// One validated event of a publish body, borrowing from the body.
#[derive(Debug)]
pub struct EventSpec<'a> {
    /// `workspace_id`.
    pub workspace_id: Cow<'a, str>,
    /// `user_id`, for a user-scoped event.
    pub user_id: Option<Cow<'a, str>>,
    /// `type`.
    pub kind: Cow<'a, str>,
    /// The payload object as received (validated JSON; may contain whitespace).
    pub payload: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item<'a> {
    #[serde(borrow)]
    workspace_id: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present_string")]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// An optional string field that, when present, must be a string: `null` is refused rather than
/// read as absent (a user-scoped event whose `user_id` is `null` must not reach the whole
/// workspace).
pub(crate) fn present_string<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct UserId;
    impl<'de> serde::de::Visitor<'de> for UserId {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("user_id to be a string (leave it out for a workspace-wide event)")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
    }
    d.deserialize_str(UserId).map(Some)
}

/// Why a body was refused (answered `400 {"error": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses and validates a whole publish body.
pub fn parse(body: &[u8], limits: BodyLimits) -> Result<Vec<EventSpec<'_>>, BodyError> {
    // One linear pass before the parser sees the body: a batch array and an event object wrap
    // each payload, so anything deeper than that plus the payload limit is refused unparsed.
    if crate::json::max_depth(body) > limits.max_depth + 2 {
        return Err(BodyError(EventError::TooDeep(limits.max_depth).to_string()));
    }
    let max_items = limits.max_items;
    let text = std::str::from_utf8(body).map_err(|_| BodyError("body is not UTF-8".into()))?;
    match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text)
                .map_err(|e| BodyError(format!("body is not a JSON array of events: {e}")))?;
            if items.len() > max_items {
                return Err(BodyError(format!(
                    "batch of {} events is over the limit of {max_items}",
                    items.len()
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    item(raw.get(), limits).map_err(|e| BodyError(format!("item {i}: {e}")))
                })
                .collect()
        }
        Some(b'{') => Ok(vec![
            item(text, limits).map_err(|e| BodyError(format!("invalid event: {e}")))?
        ]),
        _ => Err(BodyError(
            "body must be an event object or an array of them".into(),
        )),
    }
}

fn item(text: &str, limits: BodyLimits) -> Result<EventSpec<'_>, String> {
    let it: Item<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let check = |r: Result<(), EventError>| r.map_err(|e| e.to_string());
    check(check_id(
        &it.workspace_id,
        "workspace_id",
        limits.max_id_bytes,
    ))?;
    if let Some(u) = &it.user_id {
        check(check_id(u, "user_id", limits.max_id_bytes))?;
    }
    check(check_type(&it.kind))?;
    if !it.payload.get().starts_with('{') {
        return Err(EventError::PayloadNotObject.to_string());
    }
    if crate::json::max_depth(it.payload.get().as_bytes()) > limits.max_depth {
        return Err(EventError::TooDeep(limits.max_depth).to_string());
    }
    crate::json::portable(it.payload.get().as_bytes())
        .map_err(|e| EventError::NotPortable(e).to_string())?;
    crate::json::unique_keys(it.payload.get().as_bytes())
        .map_err(|e| EventError::DuplicateKey(e).to_string())?;
    Ok(EventSpec {
        workspace_id: it.workspace_id,
        user_id: it.user_id,
        kind: it.kind,
        payload: it.payload.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_batch() {
        let one = parse(
            br#"{"workspace_id":"ws_1","type":"issue.created","payload":{"b":1, "a":[2]}}"#,
            BodyLimits::default(),
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload, r#"{"b":1, "a":[2]}"#);
        let many = parse(
            br#" [ {"workspace_id":"ws_1","type":"a.b","payload":{}},
                 {"workspace_id":"ws_2","type":"c","user_id":"usr_1","payload":{"x":"\u00e9"}} ] "#,
            BodyLimits::default(),
        )
        .unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[1].user_id.as_deref(), Some("usr_1"));
        assert!(parse(b"[]", BodyLimits::default()).unwrap().is_empty());
    }

    #[test]
    fn names_the_first_bad_item() {
        let err = |b: &[u8]| parse(b, BodyLimits::default()).unwrap_err().0;
        let e = err(br#"[{"workspace_id":"w","type":"ok","payload":{}},{"workspace_id":"w","type":"Bad","payload":{}}]"#);
        assert!(e.starts_with("item 1: type \"Bad\""), "{e}");
        assert!(err(br#"{"workspace_id":"w","type":"a","payload":[1]}"#)
            .contains("payload must be a JSON object"));
        assert!(err(br#"{"workspace_id":"w","type":"a"}"#).contains("missing field `payload`"));
        assert!(err(br#"{"workspace_id":"","type":"a","payload":{}}"#).contains("workspace_id"));
        assert!(
            err(br#"{"workspace_id":"w","type":"heartbeat","payload":{}}"#).contains("heartbeat")
        );
        assert!(
            err(br#"{"workspace_id":"w","type":"a","payload":{},"extra":1}"#)
                .contains("unknown field `extra`")
        );
        assert!(err(br#"{"workspace_id":"w","type":"a","payload":{}"#).contains("EOF"));
        assert!(err(b"42").contains("event object"));
        assert!(err(&[b'['; 100]).contains("nested"));
        assert!(err(b"\xff").contains("UTF-8"));
        let big: String = format!(
            "[{}]",
            [r#"{"workspace_id":"w","type":"a","payload":{}}"#; 3].join(",")
        );
        let two = BodyLimits {
            max_items: 2,
            ..BodyLimits::default()
        };
        assert!(parse(big.as_bytes(), two)
            .unwrap_err()
            .0
            .contains("over the limit of 2"));
    }

    #[test]
    fn payload_depth_and_id_length_follow_the_limits() {
        let lim = BodyLimits {
            max_items: 10,
            max_depth: 3,
            max_id_bytes: 4,
        };
        let ok = br#"[{"workspace_id":"abcd","type":"a","payload":{"x":[{"y":1}]}}]"#;
        assert_eq!(parse(ok, lim).unwrap().len(), 1);
        let deep = br#"[{"workspace_id":"abcd","type":"a","payload":{"x":[{"y":[1]}]}}]"#;
        let e = parse(deep, lim).unwrap_err().0;
        assert!(e.contains("payload nested deeper than 3 levels"), "{e}");
        // A single event's payload is checked on its own too.
        let deep_one = br#"{"workspace_id":"abcd","type":"a","payload":{"x":[{"y":[1]}]}}"#;
        let e = parse(deep_one, lim).unwrap_err().0;
        assert!(e.contains("payload nested deeper than 3 levels"), "{e}");
        let long = br#"{"workspace_id":"abcde","type":"a","payload":{}}"#;
        let e = parse(long, lim).unwrap_err().0;
        assert!(e.contains("workspace_id must be 1 to 4 bytes"), "{e}");
        let long_user = br#"{"workspace_id":"a","user_id":"u\u0007","type":"a","payload":{}}"#;
        assert!(parse(long_user, lim).unwrap_err().0.contains("user_id"));
    }

    #[test]
    fn a_user_id_that_is_not_a_string_is_refused_null_included() {
        let err = |b: &str| parse(b.as_bytes(), BodyLimits::default()).unwrap_err().0;
        for bad in ["null", "7", "true", "[\"u\"]", "{}"] {
            let e = err(&format!(
                r#"{{"workspace_id":"w","user_id":{bad},"type":"a","payload":{{}}}}"#
            ));
            assert!(
                e.contains("invalid type") && e.contains("expected user_id to be a string"),
                "{bad}: {e}"
            );
        }
        let ok = parse(
            br#"{"workspace_id":"w","user_id":"u\u0031","type":"a","payload":{}}"#,
            BodyLimits::default(),
        )
        .unwrap();
        assert_eq!(ok[0].user_id.as_deref(), Some("u1"));
        assert_eq!(
            parse(
                br#"{"workspace_id":"w","type":"a","payload":{}}"#,
                BodyLimits::default()
            )
            .unwrap()[0]
                .user_id,
            None
        );
    }

    #[test]
    fn duplicate_keys_are_refused_in_items_and_payloads() {
        let err = |b: &str| parse(b.as_bytes(), BodyLimits::default()).unwrap_err().0;
        let e = err(r#"{"workspace_id":"w","type":"a","type":"b","payload":{}}"#);
        assert!(e.contains("duplicate field `type`"), "{e}");
        let e = err(r#"{"workspace_id":"w","type":"a","payload":{"n":1,"x":{"k":1,"k":2}}}"#);
        assert!(e.contains("duplicate key \"k\""), "{e}");
        let e = err(
            r#"[{"workspace_id":"w","type":"a","payload":{}},{"workspace_id":"w","type":"a","payload":{"a":1,"\u0061":2}}]"#,
        );
        assert!(
            e.starts_with("item 1: ") && e.contains("duplicate key"),
            "{e}"
        );
    }
}
