//! The publisher: `POST /v1/publish` over one keep-alive connection, one batch per tick.
//!
//! Every event carries its workspace's sequence number and its publish time (wall-clock
//! nanoseconds), which is all a subscriber needs to measure latency, loss and order.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to publish.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The internal listener.
    pub internal: SocketAddr,
    /// The publish key.
    pub key: String,
    /// Workspaces `prefix0` … `prefix{n-1}`.
    pub workspaces: u32,
    /// Workspace id prefix.
    pub prefix: String,
    /// Events per second per workspace.
    pub rate: f64,
    /// Batch interval: events due in one tick travel in one request.
    pub tick: Duration,
    /// Largest request body (the server's `--max-publish-bytes`).
    pub max_body: usize,
    /// Padding bytes added to each payload (frame size control).
    pub pad: usize,
}

/// What the publisher did.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Events accepted (202).
    pub events: u64,
    /// Requests made.
    pub requests: u64,
    /// Failed requests by status or error.
    pub errors: BTreeMap<String, u64>,
}

struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> io::Result<Http> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Http {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one POST and reads its response; returns the status.
    fn post(&mut self, key: &str, body: &[u8]) -> io::Result<u16> {
        let head = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: loadtest\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(body)?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((status, head_len)) = crate::wire::response_head(&self.buf) {
                let text = String::from_utf8_lossy(&self.buf[..head_len]).to_ascii_lowercase();
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= head_len + len {
                    self.buf.drain(..head_len + len);
                    return Ok(status);
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Publishes until `stop` is set; returns what was accepted.
pub fn run(plan: &Plan, stop: Arc<AtomicBool>) -> Published {
    let mut out = Published::default();
    let mut http: Option<Http> = None;
    let mut sent = vec![0u64; plan.workspaces as usize];
    let start = Instant::now();
    let mut next_tick = start;
    let pad = pad_text(plan.pad);
    let mut body = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next_tick {
            std::thread::sleep(next_tick - now);
            continue;
        }
        next_tick += plan.tick;
        let due = (start.elapsed().as_secs_f64() * plan.rate) as u64;
        let t = crate::engine::unix_ns();
        // A refused request is retried next tick with the same sequence numbers, as a real
        // publisher would, so that a 503 never shows up as loss at the subscribers.
        let before = sent.clone();
        body.clear();
        body.push(b'[');
        let mut count = 0u64;
        'fill: for (w, sent_w) in sent.iter_mut().enumerate() {
            while *sent_w < due {
                if count > 0 {
                    body.push(b',');
                }
                let _ = write!(
                    body,
                    r#"{{"workspace_id":"{}{w}","type":"loadtest.event","payload":{{"seq":{},"t":{t}{}}}}}"#,
                    plan.prefix,
                    *sent_w,
                    if pad.is_empty() {
                        String::new()
                    } else {
                        format!(r#","pad":"{pad}""#)
                    }
                );
                *sent_w += 1;
                count += 1;
                if body.len() > plan.max_body.saturating_sub(4096) {
                    break 'fill;
                }
            }
        }
        body.push(b']');
        if count == 0 {
            continue;
        }
        out.requests += 1;
        if http.is_none() {
            match Http::connect(plan.internal) {
                Ok(h) => http = Some(h),
                Err(e) => {
                    *out.errors
                        .entry(format!("connect: {}", e.kind()))
                        .or_default() += 1;
                    sent.copy_from_slice(&before);
                    continue;
                }
            }
        }
        match http.as_mut().map(|h| h.post(&plan.key, &body)) {
            Some(Ok(202)) => out.events += count,
            Some(Ok(status)) => {
                *out.errors.entry(format!("http {status}")).or_default() += 1;
                sent.copy_from_slice(&before);
            }
            Some(Err(e)) => {
                *out.errors.entry(format!("{}", e.kind())).or_default() += 1;
                http = None;
                // The request may or may not have been published: the next one starts after it,
                // so a lost response cannot turn into duplicates.
            }
            None => {}
        }
    }
    out
}

/// `len` bytes of plain words, so that a padded event compresses about as ordinary event text
/// does (a run of one letter would compress many times better than anything real).
fn pad_text(len: usize) -> String {
    const WORDS: [&str; 16] = [
        "checkout",
        "payment",
        "gateway",
        "timeout",
        "under",
        "load",
        "service",
        "latency",
        "error",
        "rate",
        "rising",
        "since",
        "deploy",
        "region",
        "west",
        "customers",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut x = 0x2545_f491u32;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORDS[(x % 16) as usize]);
    }
    out.truncate(len);
    out
}
