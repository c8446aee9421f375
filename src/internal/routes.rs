//! What the internal listener answers to one request head (and body): a pure function of the
//! bytes received, the publish key and the server's state. No socket, no waiting: a publish
//! comes back validated and encoded, for the loop to send.

use super::publish_key::PublishKey;
use crate::bus::body;
use crate::bus::publisher::{Prepared, PublishError, Publisher};
use crate::http::request::Head;
use crate::http::{response, Status};
use crate::metrics::{BusStats, ShardStats, Stats};
use std::sync::atomic::AtomicU64;

/// What to do with the request at the front of a connection's buffer.
pub enum Route {
    /// The head is complete, the body is not: wait for it. `send_continue`: the client asked
    /// for `100 Continue` and the request passed every check that needs no body.
    NeedBody {
        /// Answer `100 Continue` now.
        send_continue: bool,
    },
    /// Answer with these bytes, having consumed `consumed` bytes of the buffer; `close` ends the
    /// connection after the answer (the body, if any, was not read).
    Respond {
        /// The response.
        bytes: Vec<u8>,
        /// Bytes of the buffer the request took.
        consumed: usize,
        /// Close after answering.
        close: bool,
    },
    /// A valid publish: send it, then answer 202 (or the error the sending meets).
    Publish {
        /// The encoded events.
        prepared: Prepared,
        /// How many events (for the 202).
        events: usize,
        /// Bytes of the buffer the request took.
        consumed: usize,
    },
}

/// What routing needs to see of the server.
pub struct Context<'a> {
    /// The publish handle (validation and encoding).
    pub publisher: &'a Publisher,
    /// The publish key, if one is configured.
    pub key: Option<&'a PublishKey>,
    /// Every counter (for `/metrics`).
    pub stats: &'a Stats,
    /// `--max-publish-bytes`.
    pub max_publish_bytes: usize,
    /// The publish body rules.
    pub body_limits: body::BodyLimits,
    /// Whether the server is ready (not draining).
    pub ready: bool,
}

fn respond(bytes: Vec<u8>, consumed: usize) -> Route {
    Route::Respond {
        bytes,
        consumed,
        close: false,
    }
}

/// Answers with `status` and closes: the rest of the buffer (a body, pipelined requests) is
/// not read, since where the next request starts is no longer known.
fn refuse(status: Status, msg: &str, counter: &AtomicU64, buf_len: usize) -> Route {
    ShardStats::add(counter, 1);
    Route::Respond {
        bytes: response::json_error(status, msg, true),
        consumed: buf_len,
        close: true,
    }
}

/// Routes the request whose head is `head`, at the front of `buf`.
pub fn route(head: &Head<'_>, buf: &[u8], cx: &Context<'_>) -> Route {
    let bus = &cx.stats.bus;
    if head.transfer_encoding {
        // A proxy that reads Transfer-Encoding and this listener (which reads Content-Length
        // only) would disagree on where the body ends: the request-smuggling shape. Refused.
        return refuse(
            Status::BadRequest,
            "Transfer-Encoding is not accepted; send the body with Content-Length",
            &bus.rejected_invalid,
            buf.len(),
        );
    }
    if let Some(name) = head.repeated {
        return refuse(
            Status::BadRequest,
            &format!("the {name} header appears more than once"),
            &bus.rejected_invalid,
            buf.len(),
        );
    }
    let head_only = head.len;
    let is_head = head.method == "HEAD";
    let get = head.method == "GET" || is_head;
    let answer = |bytes: Vec<u8>| {
        respond(
            if is_head {
                response::head_only(bytes)
            } else {
                bytes
            },
            head_only,
        )
    };
    match head.path {
        b"/v1/publish" if head.method == "POST" => publish(head, buf, cx),
        b"/v1/publish" => respond(
            response::json_error(Status::MethodNotAllowed, "use POST", false),
            head_only,
        ),
        b"/metrics" if get => {
            let body = crate::metrics::render(cx.stats);
            answer(response::build(
                Status::Ok,
                crate::metrics::CONTENT_TYPE,
                body.as_bytes(),
                false,
                "",
            ))
        }
        b"/healthz" if get => answer(response::build(
            Status::Ok,
            "text/plain",
            b"ok\n",
            false,
            "",
        )),
        b"/readyz" if get => answer(if cx.ready {
            response::build(Status::Ok, "text/plain", b"ready\n", false, "")
        } else {
            response::build(Status::Unavailable, "text/plain", b"draining\n", false, "")
        }),
        b"/metrics" | b"/healthz" | b"/readyz" => {
            respond(response::plain(Status::MethodNotAllowed, false), head_only)
        }
        _ => respond(response::plain(Status::NotFound, false), head_only),
    }
}

fn publish(head: &Head<'_>, buf: &[u8], cx: &Context<'_>) -> Route {
    let stats: &BusStats = &cx.stats.bus;
    let authorized = match (cx.key, head.authorization) {
        (Some(k), Some(value)) => k.check_bearer(value),
        _ => false,
    };
    if !authorized {
        return refuse(
            Status::Unauthorized,
            "missing or invalid publish key",
            &stats.rejected_unauthorized,
            buf.len(),
        );
    }
    let len = match head.content_length {
        Some(Some(n)) => n,
        Some(None) => {
            return refuse(
                Status::BadRequest,
                "invalid Content-Length",
                &stats.rejected_invalid,
                buf.len(),
            )
        }
        None => {
            return refuse(
                Status::LengthRequired,
                "Content-Length is required",
                &stats.rejected_invalid,
                buf.len(),
            )
        }
    };
    let max = cx.max_publish_bytes;
    if len > max as u64 {
        let msg = format!("body of {len} bytes is over the limit of {max} bytes");
        return refuse(
            Status::PayloadTooLarge,
            &msg,
            &stats.rejected_too_large,
            buf.len(),
        );
    }
    let total = head.len + len as usize;
    if buf.len() < total {
        return Route::NeedBody {
            send_continue: head.expect_continue,
        };
    }
    let refused = |e: PublishError| {
        let counter = match &e {
            PublishError::Draining => &stats.rejected_draining,
            PublishError::BusUnavailable(_) => &stats.rejected_bus_unavailable,
            _ if e.status() == Status::PayloadTooLarge => &stats.rejected_too_large,
            _ => &stats.rejected_invalid,
        };
        ShardStats::add(counter, 1);
        respond(
            response::json_error(e.status(), &e.to_string(), false),
            total,
        )
    };
    let specs = match body::parse(&buf[head.len..total], cx.body_limits) {
        Ok(specs) => specs,
        Err(e) => {
            ShardStats::add(&stats.rejected_invalid, 1);
            return respond(response::json_error(Status::BadRequest, &e.0, false), total);
        }
    };
    match cx.publisher.prepare(&specs) {
        Ok(prepared) => Route::Publish {
            prepared,
            events: specs.len(),
            consumed: total,
        },
        // `prepare` counted a drain refusal itself.
        Err(PublishError::Draining) => respond(
            response::json_error(
                Status::Unavailable,
                &PublishError::Draining.to_string(),
                false,
            ),
            total,
        ),
        Err(e) => refused(e),
    }
}

/// The 202 for `n` events.
pub fn accepted(n: usize) -> Vec<u8> {
    response::build(
        Status::Accepted,
        "application/json",
        format!("{{\"accepted\":{n}}}").as_bytes(),
        false,
        "",
    )
}

/// The answer to a publish that could not be sent.
pub fn send_failed(e: &PublishError) -> Vec<u8> {
    response::json_error(e.status(), &e.to_string(), false)
}

/// The interim answer a client that sent `Expect: 100-continue` waits for.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
