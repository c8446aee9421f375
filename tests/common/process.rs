//! The server binary as a child process: spawned on ephemeral ports, its `listening` lines read,
//! killed if a test fails with it still running.

use super::*;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_causeloop-stream");

pub struct Proc {
    pub child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Proc {
    /// A failing test must not leave its server running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Proc {
    /// Starts collecting the process's stderr (its log) in the background.
    pub fn log(&mut self) -> Log {
        let pipe = self.child.stderr.take().expect("stderr not taken yet");
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut t = sink.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        Log { text }
    }
}

/// A process's log, as far as it has been written.
pub struct Log {
    text: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Log {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits (up to [`WAIT`]) until the log holds `needle`; returns the log either way, and
    /// whether it was found.
    pub fn wait_for(&self, needle: &str) -> (bool, String) {
        let found = eventually(WAIT, || self.text.lock().unwrap().contains(needle));
        (found, self.text())
    }
}

pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    spawn_at("127.0.0.1:0", "127.0.0.1:0", args, env)
}

pub fn spawn_at(listen: &str, internal: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", listen, "--internal-listen", internal])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("CAUSELOOP_JWT_HS256_SECRET")
        .env_remove("CAUSELOOP_PUBLISH_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let public = line
        .trim()
        .strip_prefix("listening public=")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let internal = line
        .trim()
        .strip_prefix("listening internal=")
        .unwrap_or_else(|| panic!("second line: {line:?}"))
        .parse()
        .unwrap();
    Proc {
        child,
        public,
        internal,
        stdout,
    }
}

pub fn secret_env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "CAUSELOOP_JWT_HS256_SECRET",
            std::str::from_utf8(SECRET).unwrap(),
        ),
        ("CAUSELOOP_PUBLISH_KEY", PUBLISH_KEY),
    ]
}

/// Subscribes with a bare socket that will never answer a close frame.
pub fn silent_subscriber(public: SocketAddr, workspace: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut sock = std::net::TcpStream::connect(public).unwrap();
    let req = format!(
        "GET /v1/stream?token={}&workspace={workspace} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(workspace, "silent", 600)
    );
    sock.write_all(req.as_bytes()).unwrap();
    // Wait until subscribed: the 101 and the `connected` frame have arrived.
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\"connected\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "closed before subscribing");
        got.extend_from_slice(&buf[..n]);
    }
    sock
}

/// The value of the first metric line starting with `line_start`.
pub fn metric(internal: SocketAddr, line_start: &str) -> Option<u64> {
    let text = raw_http(
        internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
