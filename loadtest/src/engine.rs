//! A worker: one thread, one mio loop, many WebSocket client connections.
//!
//! Written like the server it measures: non-blocking sockets, edge-triggered readiness drained to
//! `WouldBlock`, one shared read buffer, no allocation per frame (a connection buffers only the
//! tail of a frame split across reads), and frames parsed only as far as the figures need: the
//! event's `seq` and publish time `t`, the heartbeat's arrival, close codes.

use crate::spec::{Scenario, WorkerReport, WorkerSpec};
use crate::wire::{self, Frame};
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use ring::hmac;
use slab::Slab;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WAKER: Token = Token(usize::MAX - 1);
const SCRATCH: usize = 256 * 1024;

/// Commands from the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Drop every connection at once and reconnect with the seed client's backoff.
    Drop,
    /// Finish: report and exit.
    Stop,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Upgrading,
    Open,
    /// Waiting to reconnect (storm).
    Waiting,
    Done,
}

struct Conn {
    index: u64,
    stream: Option<TcpStream>,
    /// `wss://`: the connection's TLS session (a new one per connect).
    tls: Option<Box<rustls::ClientConnection>>,
    state: State,
    out: Vec<u8>,
    buf: Vec<u8>,
    started: Instant,
    expected: u64,
    last_heartbeat: Option<Instant>,
    slow: bool,
    /// Was told to stop reading at some point (its latencies are not a reader's).
    was_slow: bool,
    backoff_ms: u64,
    retry_at: Option<Instant>,
    /// Sent a close frame for churn; waiting for the server's.
    churning: bool,
    /// Its `connected` frame arrived. A slow reader stalls only from then on: on a cluster bus
    /// `connected` can follow the 101 by a Redis round trip, and a reader that stalled before
    /// it would never count as connected (its worker would never report ready).
    subscribed: bool,
    /// Its token, minted on the first connect and sent again on every reconnect, as the seed's
    /// client does (so the server can resume it).
    token: Option<String>,
    /// Times it has reconnected: from then on an event it has already had is a repeat sent on
    /// resume, not a reordering.
    reconnects: u32,
}

/// Wall-clock nanoseconds since the epoch (publisher and subscribers share the machine's clock).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds")
}

/// Serializes a histogram for the report.
pub fn encode_hist(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("in-memory serialization");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Deserializes a histogram from a report (an empty one on malformed input).
pub fn decode_hist(s: &str) -> Histogram<u64> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default();
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut &bytes[..])
        .unwrap_or_else(|_| hist())
}

/// Maps connection `i` of `total` to a workspace: uniform, or Zipf-skewed with exponent `skew`.
pub fn workspace_of(i: u64, total: u64, workspaces: u32, skew: f64) -> u32 {
    if skew <= 0.0 || workspaces <= 1 {
        return (i % workspaces.max(1) as u64) as u32;
    }
    // Deterministic low-discrepancy point in [0,1), looked up in the Zipf CDF.
    let u = ((i as f64 + 0.5) * 0.618_033_988_749_895).fract();
    let weights: Vec<f64> = (1..=workspaces)
        .map(|r| 1.0 / (r as f64).powf(skew))
        .collect();
    let sum: f64 = weights.iter().sum();
    let mut acc = 0.0;
    for (w, weight) in weights.iter().enumerate() {
        acc += weight / sum;
        if u < acc {
            return w as u32;
        }
    }
    let _ = total;
    workspaces - 1
}

/// One worker's fleet of connections.
pub struct Fleet {
    spec: WorkerSpec,
    /// Inflates compressed frames (`--compression`), and where they go.
    inflater: flate2::Decompress,
    inflated: Vec<u8>,
    poll: Poll,
    conns: Slab<Conn>,
    targets: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    key: hmac::Key,
    report: WorkerReport,
    connect_hist: Histogram<u64>,
    latency_hist: Histogram<u64>,
    heartbeat_hist: Histogram<u64>,
    interval_latency: Histogram<u64>,
    next_index: u64,
    inflight: u64,
    started: Instant,
    ready_sent: bool,
    drop_at: Option<Instant>,
    seed: u64,
    /// Churn closes owed (fractional), and when they were last accrued.
    churn_credit: f64,
    churn_last: Option<Instant>,
    /// Churn: when stalled readers next look at what they were sent.
    next_slow_wake: Option<Instant>,
    /// `wss://`: every connection's session is made from this.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Writes `bytes` to a connection at once, best effort: a pong or a close frame is tiny, and a
/// full socket here would be the server's problem to show.
fn send_now(c: &mut Conn, bytes: &[u8]) {
    match (&mut c.tls, &mut c.stream) {
        (Some(tls), Some(s)) => {
            let _ = tls.writer().write_all(bytes);
            while tls.wants_write() {
                if tls.write_tls(s).is_err() {
                    break;
                }
            }
        }
        (None, Some(s)) => {
            let _ = s.write(bytes);
        }
        _ => {}
    }
}

impl Fleet {
    /// Builds a fleet for `spec`; returns it and a waker for the command thread.
    pub fn new(spec: WorkerSpec) -> io::Result<(Fleet, Waker)> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let targets = spec
            .targets
            .iter()
            .map(|t| {
                t.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("bad target {t}"))
                })
            })
            .collect::<io::Result<Vec<SocketAddr>>>()?;
        let sources = spec
            .source_ips
            .iter()
            .map(|t| {
                t.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("bad source ip {t}"))
                })
            })
            .collect::<io::Result<Vec<IpAddr>>>()?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, spec.secret.as_bytes());
        let tls = match &spec.tls {
            Some(t) => Some(
                crate::tls::client_config(t)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let seed = spec.first.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Ok((
            Fleet {
                next_index: spec.first,
                tls,
                inflater: flate2::Decompress::new(false),
                inflated: Vec::new(),
                spec,
                poll,
                conns: Slab::new(),
                targets,
                sources,
                key,
                report: WorkerReport::default(),
                connect_hist: hist(),
                latency_hist: hist(),
                heartbeat_hist: hist(),
                interval_latency: hist(),
                inflight: 0,
                started: Instant::now(),
                ready_sent: false,
                drop_at: None,
                seed,
                churn_credit: 0.0,
                churn_last: None,
                next_slow_wake: None,
            },
            waker,
        ))
    }

    fn random(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Runs until a `Stop` command; `emit` receives progress, ready and final reports.
    pub fn run(mut self, commands: mpsc::Receiver<Command>, mut emit: impl FnMut(&WorkerReport)) {
        let mut events = Events::with_capacity(4096);
        let mut scratch = vec![0u8; SCRATCH];
        // Progress is reported just after each whole second of the run (counted from the
        // orchestrator's start), so every worker's report of second `s` covers the same second.
        let since_start = (unix_ns() / 1_000_000).saturating_sub(self.spec.started_unix_ms);
        let mut next_progress = Instant::now() + Duration::from_millis(1000 - since_start % 1000);
        loop {
            let now = Instant::now();
            self.open_due(now);
            self.retry_due(now);
            self.churn_due(now);
            self.wake_slow(now, &mut scratch);
            let timeout =
                Duration::from_millis(if self.next_index < self.spec.first + self.spec.count {
                    1
                } else {
                    50
                });
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("worker: poll: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let k = ev.token().0;
                if ev.is_writable() {
                    self.on_writable(k);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.on_readable(k, &mut scratch);
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Drop => self.drop_all(),
                    Command::Stop => {
                        self.finish(&mut scratch);
                        self.report.kind = "final".into();
                        self.fill_report(true);
                        emit(&self.report);
                        return;
                    }
                }
            }
            if !self.ready_sent
                && self.next_index == self.spec.first + self.spec.count
                && self.inflight == 0
            {
                self.ready_sent = true;
                self.report.kind = "ready".into();
                self.fill_report(false);
                emit(&self.report);
            }
            if let Some(t) = self.drop_at {
                if self.report.storm_recovered_ms.is_none() && self.report.open == self.spec.count {
                    self.report.storm_recovered_ms = Some(t.elapsed().as_millis() as u64);
                }
            }
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(1);
                self.report.t_ms = unix_ns() / 1_000_000;
                self.report.kind = "progress".into();
                self.fill_report(false);
                emit(&self.report);
                self.interval_latency.reset();
            }
        }
    }

    fn fill_report(&mut self, full: bool) {
        let r = &mut self.report;
        if full {
            r.connect_hist = encode_hist(&self.connect_hist);
            r.latency_hist = encode_hist(&self.latency_hist);
            r.heartbeat_hist = encode_hist(&self.heartbeat_hist);
        } else {
            // Progress carries only the last interval's latencies.
            r.connect_hist.clear();
            r.heartbeat_hist.clear();
            r.latency_hist = encode_hist(&self.interval_latency);
        }
        r.cpu_ns = crate::procfs::cpu_ns("self").unwrap_or(0);
    }

    fn open_due(&mut self, now: Instant) {
        let end = self.spec.first + self.spec.count;
        while self.next_index < end && self.inflight < self.spec.max_inflight {
            let k = self.next_index - self.spec.first;
            if self.spec.connect_rate > 0.0 {
                let due = self.started + Duration::from_secs_f64(k as f64 / self.spec.connect_rate);
                if due > now {
                    break;
                }
            }
            let index = self.next_index;
            self.next_index += 1;
            let slow = self.spec.scenario == Scenario::Slow
                && ((index as f64 + 0.5) * 0.754_877_666).fract() < self.spec.slow_fraction;
            let conn = Conn {
                index,
                stream: None,
                tls: None,
                state: State::Waiting,
                out: Vec::new(),
                buf: Vec::new(),
                started: now,
                expected: u64::MAX,
                last_heartbeat: None,
                slow,
                was_slow: slow,
                backoff_ms: 1000,
                retry_at: None,
                churning: false,
                subscribed: false,
                token: None,
                reconnects: 0,
            };
            self.report.slow += u64::from(slow);
            let key = self.conns.insert(conn);
            self.start(key);
        }
    }

    fn retry_due(&mut self, now: Instant) {
        if self.drop_at.is_none() && self.spec.churn_per_s <= 0.0 {
            return;
        }
        let due: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Waiting && c.retry_at.is_some_and(|t| t <= now))
            .map(|(k, _)| k)
            .take((self.spec.max_inflight.saturating_sub(self.inflight)) as usize)
            .collect();
        for k in due {
            self.start(k);
        }
    }

    /// Churn: once every connection has been opened, close `churn_per_s` of the open ones a
    /// second with a close handshake; each reconnects when the server's close arrives.
    fn churn_due(&mut self, now: Instant) {
        if self.spec.churn_per_s <= 0.0 || !self.ready_sent {
            return;
        }
        let last = self.churn_last.replace(now).unwrap_or(now);
        self.churn_credit += self.spec.churn_per_s * now.duration_since(last).as_secs_f64();
        let mut tries = 0;
        while self.churn_credit >= 1.0 && tries < 64 && !self.conns.is_empty() {
            tries += 1;
            let k = (self.random() * self.conns.capacity() as f64) as usize;
            let Some(c) = self.conns.get_mut(k) else {
                continue;
            };
            if c.state != State::Open || c.churning || c.slow {
                continue;
            }
            self.churn_credit -= 1.0;
            self.report.churned += 1;
            c.churning = true;
            let close = wire::client_frame(0x8, &1000u16.to_be_bytes());
            send_now(c, &close);
        }
        // Unpaid credit does not pile up while every connection is busy reconnecting.
        self.churn_credit = self.churn_credit.min(self.spec.churn_per_s.max(1.0));
    }

    /// Churn with stalled readers: every 90 seconds each stalled connection reads what it was
    /// sent (its 1008 close, if the server has found it), reconnects, and stalls again, so a long
    /// run keeps a steady population of slow readers for the server to find.
    fn wake_slow(&mut self, now: Instant, scratch: &mut [u8]) {
        const STALL: Duration = Duration::from_secs(90);
        if self.spec.churn_per_s <= 0.0 || self.report.slow == 0 || !self.ready_sent {
            return;
        }
        let due = *self.next_slow_wake.get_or_insert(now + STALL);
        if now < due {
            return;
        }
        self.next_slow_wake = Some(now + STALL);
        let stalled: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.slow && c.state == State::Open && c.subscribed)
            .map(|(k, _)| k)
            .collect();
        for k in stalled {
            self.conns[k].slow = false;
            self.on_readable(k, scratch);
            if let Some(c) = self.conns.get_mut(k) {
                // Not closed yet (the server had not found it): stall again.
                c.slow = c.was_slow;
            }
        }
    }

    /// Starts (or restarts) connection `k`: non-blocking connect from the next source address.
    fn start(&mut self, k: usize) {
        let index = self.conns[k].index;
        let target = self.targets[(index % self.targets.len() as u64) as usize];
        self.report.attempts += 1;
        self.inflight += 1;
        let c = &mut self.conns[k];
        c.started = Instant::now();
        c.retry_at = None;
        c.buf.clear();
        // A new subscription: its sequence starts with whatever it receives first; with
        // --continuity a reconnect goes on from where the last connection stood.
        if !self.spec.continuity || c.reconnects == 0 {
            c.expected = u64::MAX;
        }
        c.churning = false;
        c.subscribed = false;
        c.slow = c.was_slow;
        c.last_heartbeat = None;
        let result = (|| -> io::Result<TcpStream> {
            let domain = socket2::Domain::for_address(target);
            let sock =
                socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            sock.set_nonblocking(true)?;
            sock.set_nodelay(true)?;
            if self.conns[k].slow {
                // A stalled reader should stall: keep what the kernel buffers for it small.
                sock.set_recv_buffer_size(4096)?;
            }
            if !self.sources.is_empty() {
                let ip = self.sources[(index % self.sources.len() as u64) as usize];
                sock.bind(&SocketAddr::new(ip, 0).into())?;
            }
            match sock.connect(&target.into()) {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(115) || e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            Ok(TcpStream::from_std(sock.into()))
        })();
        match result {
            Ok(mut stream) => {
                if self
                    .poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(k),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_err()
                {
                    return self.fail(k, "register".into());
                }
                let c = &mut self.conns[k];
                c.stream = Some(stream);
                c.state = State::Connecting;
            }
            Err(e) => self.fail(k, error_name(&e)),
        }
    }

    fn fail(&mut self, k: usize, reason: String) {
        *self.report.failures.entry(reason).or_default() += 1;
        let was_open = self.conns[k].state == State::Open;
        if matches!(
            self.conns[k].state,
            State::Connecting | State::Upgrading | State::Waiting
        ) {
            self.inflight = self.inflight.saturating_sub(1);
        }
        self.after_close(k, was_open);
    }

    /// A connection ended: in a storm it waits to reconnect with backoff, otherwise it is done.
    fn after_close(&mut self, k: usize, was_open: bool) {
        if was_open {
            self.report.open -= 1;
        }
        let storm = self.drop_at.is_some();
        let churn = self.spec.churn_per_s > 0.0 && was_open;
        let jitter = self.random();
        let c = &mut self.conns[k];
        c.subscribed = false;
        c.tls = None;
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        if churn || storm {
            c.reconnects += 1;
        }
        if churn && !storm {
            // Churn (or a server-side close during a churn run): reconnect at once.
            c.retry_at = Some(Instant::now());
            c.state = State::Waiting;
        } else if storm {
            // The seed client: delay = reconnectDelay + random * 500; reconnectDelay doubles to 30 s.
            let delay = c.backoff_ms as f64 + jitter * 500.0;
            c.backoff_ms = (c.backoff_ms * 2).min(30_000);
            c.retry_at = Some(Instant::now() + Duration::from_millis(delay as u64));
            c.state = State::Waiting;
        } else {
            c.state = State::Done;
        }
    }

    fn on_writable(&mut self, k: usize) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.state == State::Connecting {
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.fail(k, error_name(&e)),
            }
            if stream.peer_addr().is_err() {
                return; // not connected yet
            }
            let index = c.index;
            let ws = format!(
                "{}{}",
                self.spec.workspace_prefix,
                workspace_of(index, self.spec.total, self.spec.workspaces, self.spec.skew)
            );
            let now = unix_ns() / 1_000_000_000;
            let (key, claim) = (&self.key, &self.spec.claim);
            let token = self.conns[k]
                .token
                .get_or_insert_with(|| {
                    crate::token::mint(key, claim, &ws, &format!("lt_u{index}"), now, 24 * 3600)
                })
                .clone();
            let host = self.targets[(index % self.targets.len() as u64) as usize].to_string();
            let session = match (&self.tls, &self.spec.tls) {
                (Some(config), Some(t)) => match crate::tls::session(config, &t.server_name) {
                    Ok(s) => Some(Box::new(s)),
                    Err(e) => return self.fail(k, format!("tls: {e}")),
                },
                _ => None,
            };
            let c = &mut self.conns[k];
            c.out = wire::upgrade_request(&host, &token, &ws, self.spec.compression);
            c.tls = session;
            c.state = State::Upgrading;
        }
        let c = &mut self.conns[k];
        if c.tls.is_some() {
            return self.flush_tls(k);
        }
        if c.out.is_empty() {
            return;
        }
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        loop {
            match stream.write(&c.out) {
                Ok(n) => {
                    c.out.drain(..n);
                    if c.out.is_empty() {
                        c.out = Vec::new();
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(k, error_name(&e)),
            }
        }
    }

    /// A TLS connection's writes: the pending plaintext into the session (which holds it until
    /// the handshake is done), then records onto the socket until it would block.
    fn flush_tls(&mut self, k: usize) {
        let c = &mut self.conns[k];
        let (Some(tls), Some(stream)) = (c.tls.as_mut(), c.stream.as_mut()) else {
            return;
        };
        if !c.out.is_empty() {
            if let Err(e) = tls.writer().write_all(&c.out) {
                return self.fail(k, format!("tls: {e}"));
            }
            c.out = Vec::new();
        }
        while tls.wants_write() {
            match tls.write_tls(stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(k, error_name(&e)),
            }
        }
    }

    /// Reads a TLS connection: records until the socket would block, their plaintext to
    /// `on_bytes`, and whatever the session then wants to send (its handshake).
    fn on_readable_tls(&mut self, k: usize, scratch: &mut [u8]) {
        loop {
            let Some(c) = self.conns.get_mut(k) else {
                return;
            };
            if c.slow && c.state == State::Open && c.subscribed {
                return; // a slow consumer: never reads while the run lasts
            }
            let (Some(tls), Some(stream)) = (c.tls.as_mut(), c.stream.as_mut()) else {
                return;
            };
            match tls.read_tls(stream) {
                Ok(0) => {
                    let open = c.state == State::Open;
                    return self.ended(k, None, if open { "eof" } else { "eof before upgrade" });
                }
                Ok(n) => {
                    self.report.bytes += n as u64;
                    if let Err(e) = tls.process_new_packets() {
                        let _ = tls.write_tls(stream);
                        return self.ended(k, None, &format!("tls: {e}"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return self.flush_tls(k),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.ended(k, None, &error_name(&e)),
            }
            loop {
                let Some(tls) = self.conns.get_mut(k).and_then(|c| c.tls.as_mut()) else {
                    return;
                };
                match tls.reader().read(scratch) {
                    Ok(0) => return self.ended(k, None, "eof"),
                    Ok(n) => {
                        if !self.on_bytes(k, &scratch[..n]) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return self.ended(k, None, &error_name(&e)),
                }
            }
            if self.conns.get(k).is_some_and(|c| c.tls.is_some()) {
                self.flush_tls(k);
            }
        }
    }

    fn on_readable(&mut self, k: usize, scratch: &mut [u8]) {
        if self.conns.get(k).is_some_and(|c| c.tls.is_some()) {
            return self.on_readable_tls(k, scratch);
        }
        loop {
            let Some(c) = self.conns.get_mut(k) else {
                return;
            };
            if c.slow && c.state == State::Open && c.subscribed {
                return; // a slow consumer: never reads while the run lasts
            }
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match stream.read(scratch) {
                Ok(0) => {
                    let reason = if c.state == State::Open {
                        "eof"
                    } else {
                        "eof before upgrade"
                    };
                    return self.ended(k, None, reason);
                }
                Ok(n) => {
                    self.report.bytes += n as u64;
                    if !self.on_bytes(k, &scratch[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.ended(k, None, &error_name(&e)),
            }
        }
    }

    /// The connection ended with a close `code` (or an error `reason`).
    fn ended(&mut self, k: usize, code: Option<u16>, reason: &str) {
        let c = &self.conns[k];
        match (&c.state, code) {
            (State::Open, Some(code)) => {
                let map = if c.was_slow {
                    &mut self.report.slow_closes
                } else {
                    &mut self.report.closes
                };
                *map.entry(code).or_default() += 1;
                self.after_close(k, true);
            }
            (State::Open, None) if c.was_slow => {
                // A stalled reader that looked only after the server's close timeout finds the
                // connection gone without a close frame: what a browser reports as 1006.
                *self.report.slow_closes.entry(1006).or_default() += 1;
                self.after_close(k, true);
            }
            (State::Open, None) => {
                *self.report.failures.entry(reason.to_string()).or_default() += 1;
                self.after_close(k, true);
            }
            (_, Some(code)) => self.fail(k, format!("close {code}")),
            (_, None) => self.fail(k, reason.to_string()),
        }
    }

    /// Handles bytes; returns false if the connection ended.
    fn on_bytes(&mut self, k: usize, data: &[u8]) -> bool {
        let c = &mut self.conns[k];
        let owned;
        let mut input: &[u8] = if c.buf.is_empty() {
            data
        } else {
            c.buf.extend_from_slice(data);
            owned = std::mem::take(&mut c.buf);
            &owned[..]
        };
        if c.state == State::Upgrading {
            match wire::response_head(input) {
                None => {
                    c.buf = input.to_vec();
                    return true;
                }
                Some((101, len)) => {
                    let accept = format!("Sec-WebSocket-Accept: {}\r\n", wire::ACCEPT);
                    if !input[..len]
                        .windows(accept.len())
                        .any(|w| w.eq_ignore_ascii_case(accept.as_bytes()))
                    {
                        self.fail(k, "bad Sec-WebSocket-Accept".into());
                        return false;
                    }
                    c.state = State::Open;
                    input = &input[len..];
                }
                Some((status, _)) => {
                    self.fail(k, format!("http {status}"));
                    return false;
                }
            }
        }
        let now = Instant::now();
        let now_ns = unix_ns();
        let mut inflated = std::mem::take(&mut self.inflated);
        while let Some((frame, used)) = wire::parse_frame(input) {
            let frame = match frame {
                Frame::Compressed(body) => {
                    if !wire::inflate(&mut self.inflater, body, &mut inflated) {
                        self.inflated = inflated;
                        self.fail(k, "a compressed frame that does not inflate".into());
                        return false;
                    }
                    self.report.compressed_frames += 1;
                    Frame::Text(&inflated)
                }
                other => other,
            };
            let c = &mut self.conns[k];
            match frame {
                Frame::Text(t) if t.starts_with(br#"{"type":"connected""#) => {
                    self.inflight = self.inflight.saturating_sub(1);
                    self.report.connected += 1;
                    self.report.open += 1;
                    c.subscribed = true;
                    let _ = self
                        .connect_hist
                        .record(c.started.elapsed().as_micros().max(1) as u64);
                    c.backoff_ms = 1000;
                }
                Frame::Text(t) if t.starts_with(br#"{"type":"heartbeat""#) => {
                    self.report.heartbeats += 1;
                    // Lateness is a reader's figure too: a stalled reader measures its stall.
                    if let Some(prev) = c.last_heartbeat.filter(|_| !c.was_slow) {
                        let gap = now.duration_since(prev).as_micros() as u64;
                        let late = gap.saturating_sub(self.spec.heartbeat_interval_ms * 1000);
                        let _ = self.heartbeat_hist.record(late.max(1));
                    }
                    c.last_heartbeat = Some(now);
                }
                Frame::Text(t) if t.starts_with(br#"{"type":"stream.gap""#) => {
                    // The server says this connection missed events: not a silent loss. Its
                    // sequence starts over from the next event.
                    self.report.gaps += 1;
                    c.expected = u64::MAX;
                }
                Frame::Text(t) => {
                    self.report.events += 1;
                    let mut repeat = false;
                    if let Some(seq) = wire::number_after(t, b"\"seq\":") {
                        if c.expected != u64::MAX && seq < c.expected && c.reconnects > 0 {
                            // Sent again after a reconnect (events the client had not yet
                            // acknowledged when its last connection ended).
                            self.report.repeated += 1;
                            repeat = true;
                        } else if c.expected != u64::MAX && seq != c.expected {
                            if seq > c.expected {
                                // A gap: counted lost until (unless) the missing ones turn up.
                                self.report.lost += seq - c.expected;
                            } else {
                                // Late: it was counted in a gap; it is out of order, not lost.
                                self.report.reordered += 1;
                                self.report.lost = self.report.lost.saturating_sub(1);
                            }
                        }
                        if c.expected == u64::MAX || seq >= c.expected {
                            c.expected = seq + 1;
                        }
                    }
                    // Latency is a reader's figure: a connection that stopped reading (slow
                    // scenario) would only measure its own stall, and a repeat is not a
                    // delivery (its publish time is from before the reconnect).
                    if let Some(t) =
                        wire::number_after(t, b"\"t\":").filter(|_| !c.was_slow && !repeat)
                    {
                        let us = (now_ns.saturating_sub(t) / 1000).max(1);
                        let _ = self.latency_hist.record(us);
                        let _ = self.interval_latency.record(us);
                    }
                }
                Frame::Close(code) => {
                    self.inflated = inflated;
                    self.ended(k, Some(code), "");
                    return false;
                }
                Frame::Ping(p) => {
                    let pong = wire::client_frame(0xA, p);
                    send_now(c, &pong);
                }
                Frame::Other | Frame::Compressed(_) => {} // inflated above
            }
            input = &input[used..];
        }
        self.inflated = inflated;
        let c = &mut self.conns[k];
        if !input.is_empty() {
            c.buf = input.to_vec();
        }
        true
    }

    /// Storm: every connection is dropped at once (no close handshake, as a network blip would).
    fn drop_all(&mut self) {
        self.drop_at = Some(Instant::now());
        self.report.storm_recovered_ms = None;
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stream.is_some())
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            let was_open = self.conns[k].state == State::Open;
            if !was_open {
                self.inflight = self.inflight.saturating_sub(1);
            }
            self.conns[k].backoff_ms = 1000;
            self.after_close(k, was_open);
        }
    }

    /// Slow scenario: read what the stalled connections were sent, to find their close codes.
    fn finish(&mut self, scratch: &mut [u8]) {
        let slow: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.slow && c.state == State::Open && c.subscribed)
            .map(|(k, _)| k)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        for k in slow {
            self.conns[k].slow = false;
            while Instant::now() < deadline && self.conns[k].state == State::Open {
                let before = self.report.bytes;
                self.on_readable(k, scratch);
                if self.report.bytes == before && self.conns[k].state == State::Open {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

fn error_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::AddrNotAvailable => "no source port".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ => match e.raw_os_error() {
            Some(24) => "too many open files".into(),
            Some(n) => format!("os error {n}"),
            None => format!("{:?}", e.kind()),
        },
    }
}

/// Merges reports from several workers.
pub fn merge(
    reports: &[WorkerReport],
) -> (WorkerReport, Histogram<u64>, Histogram<u64>, Histogram<u64>) {
    let mut total = WorkerReport {
        storm_recovered_ms: Some(0),
        ..WorkerReport::default()
    };
    let (mut c, mut l, mut h) = (hist(), hist(), hist());
    let add_map = |dst: &mut BTreeMap<String, u64>, src: &BTreeMap<String, u64>| {
        for (k, v) in src {
            *dst.entry(k.clone()).or_default() += v;
        }
    };
    for r in reports {
        total.attempts += r.attempts;
        total.open += r.open;
        total.connected += r.connected;
        add_map(&mut total.failures, &r.failures);
        for (k, v) in &r.closes {
            *total.closes.entry(*k).or_default() += v;
        }
        for (k, v) in &r.slow_closes {
            *total.slow_closes.entry(*k).or_default() += v;
        }
        total.slow += r.slow;
        total.events += r.events;
        total.heartbeats += r.heartbeats;
        total.bytes += r.bytes;
        total.lost += r.lost;
        total.reordered += r.reordered;
        total.repeated += r.repeated;
        total.compressed_frames += r.compressed_frames;
        total.gaps += r.gaps;
        total.churned += r.churned;
        total.cpu_ns += r.cpu_ns;
        // Recovered only when every worker recovered: the slowest one is the figure.
        total.storm_recovered_ms = match (total.storm_recovered_ms, r.storm_recovered_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        let _ = c.add(decode_hist(&r.connect_hist));
        let _ = l.add(decode_hist(&r.latency_hist));
        let _ = h.add(decode_hist(&r.heartbeat_hist));
    }
    (total, c, l, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_skewed_assignment() {
        let mut counts = [0u32; 20];
        for i in 0..2000 {
            counts[workspace_of(i, 2000, 20, 0.0) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 100));
        let mut skewed = [0u32; 20];
        for i in 0..20_000 {
            skewed[workspace_of(i, 20_000, 20, 1.0) as usize] += 1;
        }
        assert!(skewed[0] > 5 * skewed[19], "{skewed:?}");
        assert!(skewed.iter().all(|&c| c > 0));
    }

    #[test]
    fn histograms_survive_the_report() {
        let mut h = hist();
        for v in [5u64, 50, 500, 5000] {
            h.record(v).unwrap();
        }
        let back = decode_hist(&encode_hist(&h));
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
    }
}
