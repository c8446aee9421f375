//! Shared harness for the integration tests: a server on loopback ports chosen by the kernel, a
//! real WebSocket client (tungstenite over a blocking `TcpStream`), raw HTTP, and token minting.
#![allow(dead_code)]

pub mod deps;
pub mod process;
pub mod redis;
pub mod tls;

use causeloop_stream::auth::jwt;
use causeloop_stream::config::{Config, Secret};
use causeloop_stream::server::Server;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// The API document (a copy of `../shared/seed/`, checked against it by `tests/seed_client.rs`).
pub const SEED: &str = include_str!("../seed/realtime-event-stream.txt");

/// The document's JavaScript client, unchanged but for its URL and its token.
pub fn seed_client_source(url: &str, token: &str) -> String {
    let start = SEED
        .find("function connectCauseloopStream")
        .expect("client function in the seed");
    let end = SEED
        .find("Event bus integration")
        .expect("end of the example");
    let code = &SEED[start..end];
    assert_eq!(
        code.matches("'wss://api.causeloop.ai/v1/stream'").count(),
        1
    );
    assert_eq!(code.matches("'<your_access_token>'").count(), 1);
    code.replace("'wss://api.causeloop.ai/v1/stream'", &format!("'{url}'"))
        .replace("'<your_access_token>'", &format!("'{token}'"))
}

pub const SECRET: &[u8] = b"integration-test-secret-0123456789abcdef";
pub const PUBLISH_KEY: &str = "integration-publish-key";

pub type Ws = WebSocket<TcpStream>;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A test configuration: loopback, ephemeral ports, the test secret and publish key.
pub fn config() -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        publish_key: Some(Secret::from(PUBLISH_KEY.as_bytes().to_vec())),
        ..Config::default()
    };
    c.jwt.hs256_secrets = vec![Secret::from(SECRET.to_vec())];
    c
}

pub struct TestServer {
    pub server: Option<Server>,
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> TestServer {
        let mut c = config();
        f(&mut c);
        let server = Server::start(c).expect("server starts");
        TestServer {
            public: server.public_addr(),
            internal: server.internal_addr(),
            server: Some(server),
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn url(&self, token: &str, workspace: &str) -> String {
        format!(
            "ws://{}/v1/stream?token={token}&workspace={workspace}",
            self.public
        )
    }

    /// Connects with a valid token for (workspace, user) and reads the `connected` frame.
    pub fn subscribe(&self, workspace: &str, user: &str) -> Ws {
        let mut ws = connect(&self.url(&token(workspace, user, 3600), workspace));
        let first = read_text(&mut ws);
        assert!(first.starts_with(r#"{"type":"connected""#), "{first}");
        ws
    }

    pub fn publish(&self, body: &str) -> (u16, String) {
        publish_with_key(self.internal, Some(PUBLISH_KEY), body)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.wait();
        }
    }
}

/// An HS256 token for (workspace, user) expiring `ttl` seconds from now. Every token is
/// distinct (a `jti` counts up), so two connections resume from each other's records only when
/// a test reuses one token on purpose, as the seed's client does when it reconnects.
pub fn token(workspace: &str, user: &str, ttl: i64) -> String {
    token_issued(workspace, user, ttl, now())
}

/// Like [`token`], issued (`iat`) at `iat`.
pub fn token_issued(workspace: &str, user: &str, ttl: i64, iat: u64) -> String {
    static JTI: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let jti = JTI.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let exp = (now() as i64 + ttl).max(0);
    jwt::sign_hs256(
        SECRET,
        format!(r#"{{"sub":"{user}","workspace_id":"{workspace}","iat":{iat},"exp":{exp},"jti":"t{jti}"}}"#)
            .as_bytes(),
    )
}

/// Opens a WebSocket (real client, real socket). Panics if the upgrade fails.
pub fn connect(url: &str) -> Ws {
    try_connect(url).unwrap_or_else(|e| panic!("connect failed: {e}"))
}

pub fn try_connect(url: &str) -> Result<Ws, Box<tungstenite::Error>> {
    try_connect_within(url, Duration::from_secs(10))
}

/// Like [`try_connect`], with `timeout` for every read (the handshake's included).
pub fn try_connect_within(url: &str, timeout: Duration) -> Result<Ws, Box<tungstenite::Error>> {
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_nodelay(true).unwrap();
    ws_client(url, stream)
}

/// The WebSocket upgrade over `stream` (plain or TLS), its failure as the client's error.
pub fn ws_client<S: Read + Write>(
    url: &str,
    stream: S,
) -> Result<WebSocket<S>, Box<tungstenite::Error>> {
    tungstenite::client(url, stream)
        .map(|(ws, _)| ws)
        .map_err(|e| {
            Box::new(match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
            })
        })
}

/// Reads the next text frame (answering pings as tungstenite does). Panics on anything else.
pub fn read_text<S: Read + Write>(ws: &mut WebSocket<S>) -> String {
    loop {
        match ws.read().expect("read frame") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads the next text frame that is not a heartbeat. Heartbeats keep a socket's read timeout
/// from ever firing, so a lost event fails here after 20 s instead of hanging the test.
pub fn read_event<S: Read + Write>(ws: &mut WebSocket<S>) -> String {
    let start = std::time::Instant::now();
    loop {
        let t = read_text(ws);
        if !t.starts_with(r#"{"type":"heartbeat""#) {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no event within 20 s, only heartbeats"
        );
    }
}

/// How long a test waits for anything the server should do at once: far longer than it takes on
/// a loaded machine, short enough that a lost frame fails the test instead of hanging it.
pub const WAIT: Duration = Duration::from_secs(20);

/// Reads until the server's close frame; returns (code, reason). Any text frame before it fails
/// the test when `no_frames` is set. Heartbeats keep a read timeout from firing, so the wait has
/// a deadline of its own ([`WAIT`]).
pub fn expect_close<S: Read + Write>(ws: &mut WebSocket<S>, no_frames: bool) -> (u16, String) {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "no close frame within {WAIT:?}");
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(Message::Text(t)) if !no_frames => {
                let _ = t;
            }
            Ok(Message::Text(t)) => panic!("unexpected frame before close: {t}"),
            Ok(_) => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// Reads until the pong answering a ping with `payload` (skipping heartbeats and events), within
/// [`WAIT`].
pub fn expect_pong<S: Read + Write>(ws: &mut WebSocket<S>, payload: &[u8]) {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "no pong within {WAIT:?}");
        match ws.read().expect("read frame") {
            Message::Pong(p) => {
                assert_eq!(&p[..], payload, "a pong with another payload");
                return;
            }
            Message::Text(_) | Message::Ping(_) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

/// Completes the closing handshake after `expect_close` and checks the server ends the TCP
/// connection: an end of stream or a reset passes; a read timeout fails (the server kept the
/// connection open).
pub fn finish_close<S: Read + Write>(ws: &mut WebSocket<S>) {
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < WAIT,
            "the server kept the connection open"
        );
        match ws.read() {
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                return
            }
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server did not end the connection within the read timeout")
            }
            Err(tungstenite::Error::Io(_)) | Err(tungstenite::Error::Protocol(_)) => return,
            Ok(_) => {}
            Err(e) => panic!("unexpected error finishing close: {e}"),
        }
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Sends raw bytes and reads the whole response until the server closes (or `timeout`).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `POST /v1/publish` with `Connection: close`; returns (status, body).
pub fn publish_with_key(internal: SocketAddr, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = raw_http(internal, req.as_bytes());
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&resp), body)
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Parses a frame's JSON.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Sends the upgrade request for `workspace` with `token` (and `extra` header lines) on `sock`
/// and reads the response head, which must be a 101; returns it.
pub fn raw_upgrade(sock: &mut TcpStream, token: &str, workspace: &str, extra: &str) -> String {
    let req = format!(
        "GET /v1/stream?token={token}&workspace={workspace} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    sock.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        sock.read_exact(&mut b).unwrap();
        got.push(b[0]);
    }
    let head = String::from_utf8(got).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    head
}

/// Subscribes over a plain `TcpStream` (no WebSocket library): checks the 101 and reads the
/// `connected` frame, then hands back the socket for a test that must control every byte.
pub fn raw_subscribe(s: &TestServer, workspace: &str) -> TcpStream {
    let mut sock = TcpStream::connect(s.public).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = raw_upgrade(&mut sock, &token(workspace, "u", 600), workspace, "");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    let mut hdr = [0u8; 2];
    sock.read_exact(&mut hdr).unwrap();
    assert_eq!(hdr[0], 0x81);
    let mut body = vec![0u8; (hdr[1] & 0x7f) as usize];
    sock.read_exact(&mut body).unwrap();
    assert!(String::from_utf8(body).unwrap().contains("connected"));
    sock
}
