//! Dead peers: a client that vanished without a FIN, or that stopped answering pings, is found
//! and dropped within the documented bound, and clients that answer stay.
//!
//! The network-level case runs a client in a network namespace of the test's own making, then
//! silently removes its address, so the server's heartbeats go unacknowledged and only
//! `TCP_USER_TIMEOUT` can end the connection. It needs root and `ip`; without them it says so
//! loudly on stderr and does not run.

mod common;

use common::*;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tungstenite::Message;

fn open_count(s: &TestServer) -> u64 {
    s.server()
        .stats()
        .shards
        .iter()
        .map(|st| st.open.load(Ordering::Relaxed))
        .sum()
}

fn scrape(s: &TestServer) -> String {
    let resp = raw_http(
        s.internal,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

#[test]
fn a_peer_that_never_answers_pings_is_dropped_and_counted_1006() {
    let s = TestServer::with(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.ping_interval = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(400);
    });
    // Keeps its TCP connection up but never reads, so it never answers a ping.
    let mut silent = raw_subscribe(&s, "ws_dead");
    assert!(eventually(Duration::from_secs(10), || open_count(&s) == 0));
    // What it was sent before the server gave up: heartbeats and one ping (0x89, empty), and
    // no close frame, since nobody is there to read one.
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let _ = silent.read_to_end(&mut got);
    assert!(got.windows(2).any(|w| w == [0x89, 0x00]), "no ping sent");
    assert!(
        !got.contains(&0x88),
        "a close frame was sent to a dead peer"
    );
    let metrics = scrape(&s);
    assert!(
        metrics.contains(r#"causeloop_connections_closed_total{code="1006"} 1"#),
        "{metrics}"
    );
}

#[test]
fn clients_that_answer_pings_stay_connected() {
    let s = TestServer::with(|c| {
        c.heartbeat_interval = Duration::from_millis(100);
        c.ping_interval = Duration::from_millis(100);
        c.ping_timeout = Duration::from_millis(200);
    });
    let mut ws = s.subscribe("ws_alive", "u1");
    let (mut pings, mut heartbeats) = (0, 0);
    // tungstenite answers each ping as it reads it, as a browser does.
    while heartbeats < 20 {
        match ws.read().expect("still connected") {
            Message::Ping(_) => pings += 1,
            Message::Text(t) if t.starts_with(r#"{"type":"heartbeat""#) => heartbeats += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Pings every heartbeat while the answers come back: far more than one timeout's worth.
    assert!(pings >= 8, "{pings} pings in {heartbeats} heartbeats");
    assert_eq!(open_count(&s), 1);
}

/// A network namespace with a veth pair, removed on drop.
struct Netns {
    name: String,
    host_if: String,
    peer_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    fn create(net: u8) -> Result<Netns, String> {
        let id = std::process::id();
        // Named per test (`net`), so tests running side by side do not collide.
        let ns = Netns {
            name: format!("cl-dead-{id}-{net}"),
            host_if: format!("ch{net}x{id}"),
            peer_if: format!("cn{net}x{id}"),
        };
        let host = format!("10.231.{net}.1/30");
        let peer = format!("10.231.{net}.2/30");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peer_if,
        ])?;
        ip(&["link", "set", &ns.peer_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &peer, "dev", &ns.peer_if])?;
        ip(&["-n", &ns.name, "link", "set", &ns.peer_if, "up"])?;
        Ok(ns)
    }
}

/// A namespace on subnet `net` for `test`, or, when it cannot be made, the loud notice of a
/// missing dependency (a failure under `CI=true`) and `None`.
fn netns_for(test: &str, net: u8) -> Option<Netns> {
    match Netns::create(net) {
        Ok(ns) => Some(ns),
        Err(e) => {
            deps::missing(
                test,
                &format!("no network namespace: {e}"),
                "it needs root and iproute2 (apt-get install iproute2)",
            );
            None
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_peer_gone_without_a_fin_is_dropped_by_tcp_user_timeout() {
    let net = (std::process::id() % 250) as u8;
    let Some(ns) = netns_for(
        "a_peer_gone_without_a_fin_is_dropped_by_tcp_user_timeout",
        net,
    ) else {
        return;
    };
    let host_ip = format!("10.231.{net}.1");
    let s = TestServer::with(|c| {
        c.listen = format!("{host_ip}:0").parse().unwrap();
        c.heartbeat_interval = Duration::from_millis(200);
        // Pings off: only the kernel's bound can find this peer.
        c.ping_interval = Duration::ZERO;
        c.tcp_user_timeout = Duration::from_secs(1);
    });
    let port = s.public.port();
    let tok = token("ws_netns", "u1", 600);
    // The client lives in the namespace: bash's /dev/tcp, the upgrade request, then silence.
    let script = format!(
        "exec 3<>/dev/tcp/{host_ip}/{port} && printf 'GET /v1/stream?token={tok}&workspace=ws_netns HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n' >&3 && sleep 60"
    );
    let mut client = Command::new("ip")
        .args(["netns", "exec", &ns.name, "bash", "-c", &script])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the namespaced client");
    let subscribed = eventually(Duration::from_secs(10), || open_count(&s) == 1);
    // The peer vanishes: its address is gone, so the server's packets are dropped in silence,
    // with no RST and no FIN.
    let vanished = ip(&["-n", &ns.name, "addr", "flush", "dev", &ns.peer_if]);
    // The kernel's default would keep retransmitting for about 15 minutes; with a 1 s
    // TCP_USER_TIMEOUT and 200 ms heartbeats the connection must go within seconds.
    let reaped = eventually(Duration::from_secs(15), || open_count(&s) == 0);
    let _ = client.kill();
    let _ = client.wait();
    assert!(subscribed, "the namespaced client never subscribed");
    vanished.unwrap();
    assert!(reaped, "the vanished peer was still open after 15 s");
}

/// Runs `f` with the calling thread in network namespace `ns`, then puts it back: a socket made
/// inside stays in the namespace.
fn in_netns<T>(ns: &str, f: impl FnOnce() -> T) -> T {
    use std::os::fd::AsRawFd;
    let home = std::fs::File::open("/proc/self/ns/net").unwrap();
    let there = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    assert_eq!(
        unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns into {ns}"
    );
    let out = f();
    assert_eq!(
        unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns back"
    );
    out
}

#[test]
fn a_client_gone_without_a_fin_that_comes_back_is_replayed_what_it_missed() {
    let net = ((std::process::id() + 1) % 250) as u8;
    let Some(ns) = netns_for(
        "a_client_gone_without_a_fin_that_comes_back_is_replayed_what_it_missed",
        net,
    ) else {
        return;
    };
    let host_ip = format!("10.231.{net}.1");
    let s = TestServer::with(|c| {
        c.listen = format!("{host_ip}:0").parse().unwrap();
        c.heartbeat_interval = Duration::from_millis(100);
        c.ack_interval = Duration::from_millis(100);
        // Neither pings nor the kernel find it first: the reconnect's probe must.
        c.ping_interval = Duration::ZERO;
        c.tcp_user_timeout = Duration::from_secs(60);
    });
    let tok = token("ws_gone", "u1", 600);
    let url = s.url(&tok, "ws_gone");
    // The first connection comes from inside the namespace.
    let stream = in_netns(&ns.name, || std::net::TcpStream::connect(s.public).unwrap());
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (mut a, _) = tungstenite::client(url.as_str(), stream).unwrap();
    assert!(read_text(&mut a).starts_with(r#"{"type":"connected""#));
    let publisher = s.server().publisher();
    let publish = |n: u64| {
        publisher
            .publish("ws_gone", "test.seq", &serde_json::json!({ "n": n }))
            .unwrap()
    };
    let mut before = Vec::new();
    for n in 0..50 {
        publish(n);
    }
    while before.len() < 50 {
        let v = json(&read_event(&mut a));
        before.push(v["payload"]["n"].as_u64().unwrap());
    }
    // The client vanishes: no FIN, no RST, its packets dropped in silence. Events go on.
    ip(&["-n", &ns.name, "addr", "flush", "dev", &ns.peer_if]).unwrap();
    for n in 50..100 {
        publish(n);
    }
    // It comes back (from the host side) with the same token while the server still holds
    // the old connection open.
    assert_eq!(open_count(&s), 1);
    let mut b = connect(&url);
    assert!(read_text(&mut b).starts_with(r#"{"type":"connected""#));
    for n in 100..120 {
        publish(n);
    }
    let mut after: Vec<u64> = Vec::new();
    while after.last() != Some(&119) {
        let v = json(&read_event(&mut b));
        assert_eq!(v["type"], "test.seq", "{v}");
        after.push(v["payload"]["n"].as_u64().unwrap());
    }
    // Every event once, in order, but for a repeat of the unacknowledged tail of `before`.
    let first = after[0];
    assert!(first <= 50, "lost {first:?}..50: resumed at {first}");
    assert!(after.windows(2).all(|w| w[0] + 1 == w[1]), "{after:?}");
    assert_eq!(before, (0..50).collect::<Vec<_>>());
    eprintln!("gone without a FIN: {} repeated", 50 - first);
    let metrics = scrape(&s);
    assert!(
        metrics.contains(r#"causeloop_connections_closed_total{code="1006"} 1"#),
        "the vanished connection was not dropped as a dead peer: {metrics}"
    );
}
