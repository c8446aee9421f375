//! Bounded parsing of an HTTP/1.1 request head, and the routing of the public listener.
//!
//! [`parse_head`] is a pure function of the bytes received so far: it returns `Ok(None)` until
//! the head is complete, and refuses a head larger than the bound before buffering more.

use super::query::{parse_stream_query, StreamQuery};
use super::Status;
use base64::Engine;

/// The highest `--max-request-headers`. The header slots live on the stack uninitialised, so the
/// cap costs nothing per request.
pub use crate::config::MAX_REQUEST_HEADERS;

/// Why a request head cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Over the size or header-count bound: 431.
    TooLarge,
    /// Not HTTP/1.x: 400.
    Malformed,
}

impl HeadError {
    /// The status this error is answered with.
    pub fn status(self) -> Status {
        match self {
            HeadError::TooLarge => Status::HeaderFieldsTooLarge,
            HeadError::Malformed => Status::BadRequest,
        }
    }
}

/// The parts of a request head this server looks at.
#[derive(Debug, Default)]
pub struct Head<'a> {
    /// Request method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a [u8],
    /// The query without `?` (empty if none).
    pub query: &'a [u8],
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// `Upgrade: websocket` present.
    pub upgrade_websocket: bool,
    /// `Connection` lists `upgrade`.
    pub connection_upgrade: bool,
    /// `Connection` lists `close`.
    pub connection_close: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<&'a [u8]>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<&'a [u8]>,
    /// The first acceptable `permessage-deflate` offer of the `Sec-WebSocket-Extensions`
    /// headers, in order.
    pub deflate: Option<crate::ws::extensions::Agreed>,
    /// `Content-Length`, `Some(None)` when present but not a number.
    pub content_length: Option<Option<u64>>,
    /// `Transfer-Encoding` present.
    pub transfer_encoding: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Authorization`. Secret: never log.
    pub authorization: Option<&'a [u8]>,
    /// A header that must appear at most once appeared twice (`Authorization`,
    /// `Sec-WebSocket-Key`, `Sec-WebSocket-Version`, `Upgrade`: RFC 6455 §11.3, RFC 9110 §5.3):
    /// its name. Such a request is refused with 400, since two readers of it could pick
    /// different values.
    pub repeated: Option<&'static str>,
    /// Length of the head in bytes, including the blank line.
    pub len: usize,
}

/// Parses a request head from the start of `buf`: at most `max_head` bytes and `max_headers`
/// header fields (capped at [`MAX_REQUEST_HEADERS`]).
pub fn parse_head(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Head<'_>>, HeadError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let slots = &mut slots[..max_headers.min(MAX_REQUEST_HEADERS)];
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => {
            return Err(if buf.len() > max_head {
                HeadError::TooLarge
            } else {
                HeadError::Malformed
            })
        }
    };
    if len > max_head {
        return Err(HeadError::TooLarge);
    }
    let target = req.path.unwrap_or("/").as_bytes();
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    let mut head = Head {
        method: req.method.unwrap_or(""),
        path,
        query,
        minor_version: req.version.unwrap_or(1),
        len,
        ..Head::default()
    };
    let mut upgrade_seen = false;
    for h in req.headers.iter() {
        let name = h.name;
        let mut once = |seen: bool, label: &'static str| {
            if seen && head.repeated.is_none() {
                head.repeated = Some(label);
            }
        };
        if name.eq_ignore_ascii_case("upgrade") {
            once(upgrade_seen, "Upgrade");
            upgrade_seen = true;
            head.upgrade_websocket |= has_token(h.value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            head.connection_upgrade |= has_token(h.value, b"upgrade");
            head.connection_close |= has_token(h.value, b"close");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            once(head.ws_key.is_some(), "Sec-WebSocket-Key");
            head.ws_key = head.ws_key.or(Some(trim(h.value)));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            if head.deflate.is_none() {
                head.deflate = crate::ws::extensions::negotiate([h.value]);
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            once(head.ws_version.is_some(), "Sec-WebSocket-Version");
            head.ws_version = head.ws_version.or(Some(trim(h.value)));
        } else if name.eq_ignore_ascii_case("content-length") {
            let parsed = content_length(trim(h.value));
            // Two different lengths are a smuggling attempt: treat as unparseable.
            head.content_length = match head.content_length {
                None => Some(parsed),
                Some(prev) if prev == parsed => Some(prev),
                Some(_) => Some(None),
            };
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue |= trim(h.value).eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("authorization") {
            once(head.authorization.is_some(), "Authorization");
            head.authorization = head.authorization.or(Some(trim(h.value)));
        }
    }
    Ok(Some(head))
}

/// A `Content-Length` value: ASCII digits only (RFC 9110 §8.6: no sign, no spaces inside), at
/// most 19 of them so that it fits a `u64`.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

/// What the public listener does with a request; borrows from the request head.
#[derive(Debug)]
pub enum PublicRoute<'a> {
    /// A valid WebSocket upgrade on `/v1/stream`.
    Stream {
        /// `Sec-WebSocket-Key`, validated.
        key: &'a [u8],
        /// The decoded query (token and workspace).
        query: StreamQuery<'a>,
        /// The `permessage-deflate` offer taken, if any.
        deflate: Option<crate::ws::extensions::Agreed>,
    },
    /// `GET /healthz` (`head`: a `HEAD`, answered without the body).
    Health {
        /// The method was `HEAD`.
        head: bool,
    },
    /// `GET /readyz` (`head` as for `Health`).
    Ready {
        /// The method was `HEAD`.
        head: bool,
    },
    /// `GET /` (`head` as for `Health`): the `--dev` page, or 404.
    Root {
        /// The method was `HEAD`.
        head: bool,
    },
    /// `POST /dev/publish`: the `--dev` page's form, or 404.
    DevPublish {
        /// `Content-Length`, when present and a number.
        content_length: Option<u64>,
    },
    /// Answer with this status and close.
    Reject(Status),
}

/// Routes a request head received on the public listener.
pub fn route_public<'a>(head: &Head<'a>) -> PublicRoute<'a> {
    if head.repeated.is_some() {
        return PublicRoute::Reject(Status::BadRequest);
    }
    match head.path {
        b"/v1/stream" => {
            let is_get = head.method == "GET" && head.minor_version == 1;
            if !(is_get && head.upgrade_websocket && head.connection_upgrade) {
                return PublicRoute::Reject(Status::UpgradeRequired);
            }
            if head.ws_version != Some(b"13") {
                return PublicRoute::Reject(Status::UpgradeRequired);
            }
            match head.ws_key {
                Some(key) if valid_ws_key(key) => PublicRoute::Stream {
                    key,
                    query: parse_stream_query(head.query),
                    deflate: head.deflate,
                },
                _ => PublicRoute::Reject(Status::BadRequest),
            }
        }
        b"/healthz" | b"/readyz" if head.method != "GET" && head.method != "HEAD" => {
            PublicRoute::Reject(Status::MethodNotAllowed)
        }
        b"/healthz" => PublicRoute::Health {
            head: head.method == "HEAD",
        },
        b"/readyz" => PublicRoute::Ready {
            head: head.method == "HEAD",
        },
        b"/" if head.method == "GET" || head.method == "HEAD" => PublicRoute::Root {
            head: head.method == "HEAD",
        },
        b"/dev/publish" if head.method == "POST" => PublicRoute::DevPublish {
            content_length: head.content_length.flatten(),
        },
        _ => PublicRoute::Reject(Status::NotFound),
    }
}

/// A `Sec-WebSocket-Key` must be base64 of exactly 16 bytes (RFC 6455 §4.1).
fn valid_ws_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut decoded)
            .is_ok_and(|n| n == 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /v1/stream?token=t.o.k&workspace=ws_1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn partial_until_blank_line() {
        for cut in 0..UPGRADE.len() {
            assert!(
                parse_head(&UPGRADE[..cut], 8192, 64).unwrap().is_none(),
                "cut {cut}"
            );
        }
        let head = parse_head(UPGRADE, 8192, 64).unwrap().unwrap();
        assert_eq!(head.len, UPGRADE.len());
    }

    #[test]
    fn routes_a_browser_upgrade() {
        let head = parse_head(UPGRADE, 8192, 64).unwrap().unwrap();
        match route_public(&head) {
            PublicRoute::Stream {
                key,
                query,
                deflate,
            } => {
                assert_eq!(deflate, None, "nothing offered");
                assert_eq!(key, b"dGhlIHNhbXBsZSBub25jZQ==");
                assert_eq!(query.workspace.as_deref(), Some("ws_1"));
                assert_eq!(query.token.as_deref(), Some(&b"t.o.k"[..]));
                assert!(matches!(query.token, Some(std::borrow::Cow::Borrowed(_))));
            }
            other => panic!("{other:?}"),
        }
    }

    fn status_of(req: &[u8]) -> Status {
        match parse_head(req, 8192, 64) {
            Err(e) => e.status(),
            Ok(Some(h)) => match route_public(&h) {
                PublicRoute::Reject(s) => s,
                PublicRoute::Health { .. } | PublicRoute::Ready { .. } => Status::Ok,
                PublicRoute::Stream { .. } => Status::Accepted,
                // What the shard answers outside `--dev`.
                PublicRoute::Root { .. } | PublicRoute::DevPublish { .. } => Status::NotFound,
            },
            Ok(None) => panic!("incomplete"),
        }
    }

    #[test]
    fn edge_statuses() {
        assert_eq!(
            status_of(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n"),
            Status::UpgradeRequired
        );
        assert_eq!(
            status_of(b"POST /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n"),
            Status::UpgradeRequired
        );
        assert_eq!(status_of(b"GET /nope HTTP/1.1\r\n\r\n"), Status::NotFound);
        assert_eq!(status_of(b"GET /healthz HTTP/1.1\r\n\r\n"), Status::Ok);
        assert_eq!(
            status_of(b"DELETE /readyz HTTP/1.1\r\n\r\n"),
            Status::MethodNotAllowed
        );
        assert_eq!(status_of(b"\x16\x03\x01 junk\r\n\r\n"), Status::BadRequest);
        let bad_key = String::from_utf8(UPGRADE.to_vec())
            .unwrap()
            .replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        assert_eq!(status_of(bad_key.as_bytes()), Status::BadRequest);
        let old = String::from_utf8(UPGRADE.to_vec())
            .unwrap()
            .replace("Version: 13", "Version: 8");
        assert_eq!(status_of(old.as_bytes()), Status::UpgradeRequired);
    }

    #[test]
    fn oversized_heads_are_refused_before_completion() {
        let mut big = b"GET /healthz HTTP/1.1\r\nX-Pad: ".to_vec();
        big.resize(9000, b'a');
        assert_eq!(parse_head(&big, 8192, 64).unwrap_err(), HeadError::TooLarge);
        let mut many = b"GET /healthz HTTP/1.1\r\n".to_vec();
        for i in 0..65 {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_head(&many, 8192, 64).unwrap_err(),
            HeadError::TooLarge
        );
        // The count is the configured one, not a compile-time constant.
        assert!(parse_head(&many, 8192, 65).unwrap().is_some());
        assert_eq!(parse_head(&many, 8192, 8).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn content_length_is_digits_only() {
        let len = |v: &str| {
            let req = format!("POST /v1/publish HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            parse_head(req.as_bytes(), 8192, 64)
                .unwrap()
                .unwrap()
                .content_length
        };
        assert_eq!(len("12"), Some(Some(12)));
        assert_eq!(len(" 12 "), Some(Some(12)));
        for bad in [
            "+12",
            "-1",
            "1 2",
            "0x10",
            "1e3",
            "99999999999999999999",
            "",
        ] {
            assert_eq!(len(bad), Some(None), "{bad:?}");
        }
    }

    #[test]
    fn headers_that_must_be_single_are_refused_when_repeated() {
        let twice = |h: &str| {
            let req = format!(
                "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{h}\r\n"
            );
            let head = parse_head(req.as_bytes(), 8192, 64).unwrap().unwrap();
            (head.repeated, status_of(req.as_bytes()))
        };
        assert_eq!(twice(""), (None, Status::Accepted));
        assert_eq!(
            twice("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
            (Some("Sec-WebSocket-Key"), Status::BadRequest)
        );
        assert_eq!(
            twice("sec-websocket-version: 13\r\n"),
            (Some("Sec-WebSocket-Version"), Status::BadRequest)
        );
        assert_eq!(
            twice("Upgrade: websocket\r\n"),
            (Some("Upgrade"), Status::BadRequest)
        );
        let auth = parse_head(
            b"POST /v1/publish HTTP/1.1\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n",
            8192,
            64,
        )
        .unwrap()
        .unwrap();
        assert_eq!(auth.repeated, Some("Authorization"));
        assert_eq!(auth.authorization, Some(&b"Bearer a"[..]));
    }

    #[test]
    fn expect_continue_and_transfer_encoding_are_seen() {
        let h = parse_head(
            b"POST /v1/publish HTTP/1.1\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n",
            8192,
            64,
        )
        .unwrap()
        .unwrap();
        assert!(h.expect_continue && h.transfer_encoding);
    }

    #[test]
    fn conflicting_content_lengths_are_unparseable() {
        let h = parse_head(
            b"POST /v1/publish HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            8192,
            64,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.content_length, Some(None));
    }
}
