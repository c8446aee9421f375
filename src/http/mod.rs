//! HTTP/1.1 as far as this server needs it: bounded request-head parsing (httparse), the routing
//! of both listeners, query-string decoding and canned responses.

pub mod query;
pub mod request;
pub mod response;

/// HTTP statuses the server answers with, each a variant so that the status table lives in one
/// place ([`Status::line`]) and `docs/protocol.md` can mirror it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 200: health and readiness probes, metrics.
    Ok,
    /// 202: events accepted for fan-out.
    Accepted,
    /// 400: malformed request or invalid publish body.
    BadRequest,
    /// 401: bad or missing publish key.
    Unauthorized,
    /// 404: unknown path.
    NotFound,
    /// 405: known path, wrong method.
    MethodNotAllowed,
    /// 411: a publish without `Content-Length`.
    LengthRequired,
    /// 413: publish body over `--max-publish-bytes`.
    PayloadTooLarge,
    /// 426: `/v1/stream` requested without a WebSocket upgrade.
    UpgradeRequired,
    /// 431: request head over the bound.
    HeaderFieldsTooLarge,
    /// 503: draining, or not ready.
    Unavailable,
}

impl Status {
    /// Every status, for tables and tests (`tests/protocol_doc.rs` checks docs/protocol.md
    /// against it).
    pub const ALL: [Status; 11] = [
        Status::Ok,
        Status::Accepted,
        Status::BadRequest,
        Status::Unauthorized,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::LengthRequired,
        Status::PayloadTooLarge,
        Status::UpgradeRequired,
        Status::HeaderFieldsTooLarge,
        Status::Unavailable,
    ];

    /// The numeric code.
    pub fn code(self) -> u16 {
        self.line()[9..12].parse().expect("a three-digit code")
    }

    /// The status line, without the trailing CRLF.
    pub fn line(self) -> &'static str {
        match self {
            Status::Ok => "HTTP/1.1 200 OK",
            Status::Accepted => "HTTP/1.1 202 Accepted",
            Status::BadRequest => "HTTP/1.1 400 Bad Request",
            Status::Unauthorized => "HTTP/1.1 401 Unauthorized",
            Status::NotFound => "HTTP/1.1 404 Not Found",
            Status::MethodNotAllowed => "HTTP/1.1 405 Method Not Allowed",
            Status::LengthRequired => "HTTP/1.1 411 Length Required",
            Status::PayloadTooLarge => "HTTP/1.1 413 Payload Too Large",
            Status::UpgradeRequired => "HTTP/1.1 426 Upgrade Required",
            Status::HeaderFieldsTooLarge => "HTTP/1.1 431 Request Header Fields Too Large",
            Status::Unavailable => "HTTP/1.1 503 Service Unavailable",
        }
    }
}
