//! Canned HTTP responses. Bodies are fixed strings or JSON built by the caller; nothing from the
//! request is ever reflected into a response.

use super::Status;

/// A complete response with `body` of `content_type`. `close` adds `Connection: close`.
pub fn build(
    status: Status,
    content_type: &str,
    body: &[u8],
    close: bool,
    extra_headers: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(status.line().as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(extra_headers.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// The answer to a `HEAD`: `response` (built for the `GET`) without its body, its
/// `Content-Length` kept (RFC 9110 §9.3.2).
pub fn head_only(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// A plain-text response whose body is the status line's reason, for edge statuses.
pub fn plain(status: Status, close: bool) -> Vec<u8> {
    let line = status.line();
    let reason = line.splitn(3, ' ').nth(2).unwrap_or("");
    let extra = if status == Status::UpgradeRequired {
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let mut body = reason.as_bytes().to_vec();
    body.push(b'\n');
    build(status, "text/plain; charset=utf-8", &body, close, extra)
}

/// A JSON `{"error":"..."}` response.
pub fn json_error(status: Status, message: &str, close: bool) -> Vec<u8> {
    let mut body = b"{\"error\":".to_vec();
    crate::json::write_string(&mut body, message);
    body.push(b'}');
    build(status, "application/json", &body, close, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_required_says_which_upgrade() {
        let r = String::from_utf8(plain(Status::UpgradeRequired, true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("\r\n\r\nUpgrade Required\n"));
    }

    #[test]
    fn a_head_answer_keeps_the_length_and_drops_the_body() {
        let get = build(Status::Ok, "text/plain", b"ok\n", false, "");
        let head = String::from_utf8(head_only(get)).unwrap();
        assert!(head.contains("Content-Length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn json_errors_are_escaped() {
        let r = String::from_utf8(json_error(Status::BadRequest, "bad \"x\"", false)).unwrap();
        assert!(r.ends_with("{\"error\":\"bad \\\"x\\\"\"}"));
        assert!(r.contains("Content-Length: 21\r\n"));
    }
}
