//! `--dev`'s page: under `--dev` only, `GET /` on the public listener answers one small,
//! self-contained page (no CDN, no build step) that connects with the API document's own client
//! code (`connectCauseloopStream`, cut from the document and unchanged but for its URL) using the
//! dev token, and shows the connection state, every frame (heartbeats folded into a count), the
//! client's own log lines (close codes, reconnects), and a form that publishes an event.
//!
//! The form posts to `POST /dev/publish` on the public listener: the shard checks the event the
//! way `POST /v1/publish` does and hands it to a publishing thread, so the publish key never
//! reaches the page and a shard never waits on its own inbox. Outside `--dev` both routes are
//! 404, as every unknown path.

use crate::bus::body::{self, BodyLimits};
use crate::ws::SharedFrame;
use std::fmt;

/// The API document, whose client the page runs.
const DOCUMENT: &str = include_str!("../../tests/seed/realtime-event-stream.txt");
/// The page, with `/*DEV*/ {}` and `/*CLIENT*/` to fill in.
const PAGE: &str = include_str!("page.html");
/// The document's stream URL, which the page replaces with its own server's.
const DOCUMENT_URL: &str = "'wss://api.causeloop.ai/v1/stream'";
/// Largest `POST /dev/publish` body.
pub const MAX_BODY: usize = 16 * 1024;
/// Dev publishes waiting for the publishing thread.
const QUEUE: usize = 64;

/// The document's `connectCauseloopStream`, its URL pointed at the page's own server.
pub fn seed_client() -> String {
    let start = DOCUMENT
        .find("function connectCauseloopStream")
        .expect("the document's client");
    let end = start
        + DOCUMENT[start..]
            .find("// Usage")
            .expect("the end of the client function");
    DOCUMENT[start..end].replace(DOCUMENT_URL, "STREAM_URL.href")
}

/// What the shards serve under `--dev`.
pub struct DevSite {
    /// The whole `GET /` response.
    page: SharedFrame,
    workspace: String,
    limits: BodyLimits,
    queue: crossbeam_channel::Sender<Vec<u8>>,
}

impl fmt::Debug for DevSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The page holds the dev token: never printed.
        f.debug_struct("DevSite")
            .field("workspace", &self.workspace)
            .finish_non_exhaustive()
    }
}

/// What a `POST /dev/publish` gets.
#[derive(Debug, PartialEq, Eq)]
pub enum DevPublish {
    /// Checked and queued: 202.
    Queued,
    /// Refused: 400 with the reason.
    Invalid(String),
    /// The queue is full: 503.
    Busy,
}

impl DevSite {
    /// The page for `workspace` and `user` with `token`; events the form publishes go to
    /// `workspace`, through the returned receiver (which a thread with a publisher drains, see
    /// [`DevSite::publish_queued`]).
    pub fn new(
        workspace: &str,
        user: &str,
        token: &str,
        limits: BodyLimits,
    ) -> (DevSite, crossbeam_channel::Receiver<Vec<u8>>) {
        let mut dev = Vec::new();
        dev.extend_from_slice(b"{\"workspace\":");
        crate::json::write_string(&mut dev, workspace);
        dev.extend_from_slice(b",\"user\":");
        crate::json::write_string(&mut dev, user);
        dev.extend_from_slice(b",\"token\":");
        crate::json::write_string(&mut dev, token);
        dev.push(b'}');
        let html = PAGE
            .replace("/*DEV*/ {}", &String::from_utf8_lossy(&dev))
            .replace("/*CLIENT*/", &seed_client());
        let page = crate::http::response::build(
            crate::http::Status::Ok,
            "text/html; charset=utf-8",
            html.as_bytes(),
            true,
            "Cache-Control: no-store\r\n",
        );
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        (
            DevSite {
                page: SharedFrame::from(page),
                workspace: workspace.to_string(),
                limits,
                queue: tx,
            },
            rx,
        )
    }

    /// The `GET /` response.
    pub fn page(&self) -> SharedFrame {
        self.page.clone()
    }

    /// A `POST /dev/publish` body, `{"type": "...", "payload": {...}}`: checked as
    /// `POST /v1/publish` checks an event of the dev workspace, then queued.
    pub fn publish(&self, body: &[u8]) -> DevPublish {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            payload: &'a serde_json::value::RawValue,
        }
        let form: Form<'_> = match serde_json::from_slice(body) {
            Ok(f) => f,
            Err(e) => {
                return DevPublish::Invalid(format!("expected {{\"type\",\"payload\"}}: {e}"))
            }
        };
        let mut publish = Vec::with_capacity(body.len() + 64);
        publish.extend_from_slice(b"{\"workspace_id\":");
        crate::json::write_string(&mut publish, &self.workspace);
        publish.extend_from_slice(b",\"type\":");
        crate::json::write_string(&mut publish, &form.kind);
        publish.extend_from_slice(b",\"payload\":");
        publish.extend_from_slice(form.payload.get().as_bytes());
        publish.push(b'}');
        if let Err(e) = body::parse(&publish, self.limits) {
            return DevPublish::Invalid(e.to_string());
        }
        match self.queue.try_send(publish) {
            Ok(()) => DevPublish::Queued,
            Err(_) => DevPublish::Busy,
        }
    }

    /// Drains `queue` into `publisher` until every sender is gone: the dev publishing thread.
    pub fn publish_queued(
        queue: crossbeam_channel::Receiver<Vec<u8>>,
        publisher: crate::bus::Publisher,
        limits: BodyLimits,
    ) {
        for body in queue {
            let result = body::parse(&body, limits)
                .map_err(|e| e.to_string())
                .and_then(|specs| publisher.publish_specs(&specs).map_err(|e| e.to_string()));
            if let Err(e) = result {
                log::warn!("dev page publish refused: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BodyLimits {
        BodyLimits {
            max_items: 100,
            max_depth: 32,
            max_id_bytes: 128,
        }
    }

    #[test]
    fn the_page_runs_the_documents_client_against_its_own_server() {
        let (site, _rx) = DevSite::new("ws_dev", "usr_dev", "tok.en.x", limits());
        let page = String::from_utf8(site.page().to_vec()).unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(
            page.contains("function connectCauseloopStream({ accessToken, workspaceId, onEvent })")
        );
        assert!(page.contains("new URL(STREAM_URL.href)"));
        assert!(!page.contains("api.causeloop.ai"));
        assert!(page.contains(
            r#"const DEV = {"workspace":"ws_dev","user":"usr_dev","token":"tok.en.x"};"#
        ));
        assert!(!page.contains("/*CLIENT*/"));
        // Self-contained: nothing loaded from elsewhere.
        assert!(!page.contains("<script src") && !page.contains("<link"));
    }

    #[test]
    fn a_publish_is_checked_then_queued() {
        let (site, rx) = DevSite::new("ws_dev", "u", "t", limits());
        assert_eq!(
            site.publish(br#"{"type":"issue.created","payload":{"title":"x"}}"#),
            DevPublish::Queued
        );
        let queued = String::from_utf8(rx.try_recv().unwrap()).unwrap();
        assert_eq!(
            queued,
            r#"{"workspace_id":"ws_dev","type":"issue.created","payload":{"title":"x"}}"#
        );
        assert!(matches!(site.publish(b"not json"), DevPublish::Invalid(_)));
        assert!(matches!(
            site.publish(br#"{"type":"issue.created","payload":[1]}"#),
            DevPublish::Invalid(_)
        ));
        assert!(matches!(
            site.publish(br#"{"type":"x","payload":{},"workspace_id":"other"}"#),
            DevPublish::Invalid(_)
        ));
        for _ in 0..QUEUE {
            let _ = site.publish(br#"{"type":"t","payload":{}}"#);
        }
        assert_eq!(
            site.publish(br#"{"type":"t","payload":{}}"#),
            DevPublish::Busy
        );
    }
}
