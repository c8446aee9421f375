//! Nothing lost across nodes (`--bus-wire 2`), with real Redis, real nodes and a real
//! WebSocket client: positions assigned by the Redis function, a backend publishing through the
//! function itself (a raw RESP connection, as any language's client would), a node whose
//! subscription Redis killed reading what it missed from the workspace's history stream, and a
//! Redis that lost its data telling the clients with `stream.gap`.

mod common;

use common::redis::Redis;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(20);

fn node_v2(redis: &Redis) -> TestServer {
    let mut bus = redis.bus();
    if let causeloop_stream::config::BusConfig::Redis(r) = &mut bus {
        r.wire = 2;
    }
    TestServer::with(move |c| {
        c.bus = bus;
        c.heartbeat_interval = Duration::from_millis(200);
    })
}

/// A backend's own connection to Redis, publishing through the function as the docs say.
struct Backend {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Backend {
    fn connect(redis: &Redis) -> Backend {
        let s = TcpStream::connect(("127.0.0.1", redis.port)).expect("connect to redis");
        s.set_read_timeout(Some(WAIT)).unwrap();
        Backend {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn command(&mut self, args: &[&str]) -> String {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(out.as_bytes()).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("redis answers");
        line.trim_end().to_string()
    }

    /// `FCALL causeloop_publish` of one event of `ws`; returns Redis's answer (`:offset`),
    /// which must not be an error.
    fn publish(&mut self, ws: &str, n: u64) -> String {
        let answer = self.publish_raw(ws, n);
        assert!(answer.starts_with(':'), "{answer}");
        answer
    }

    fn publish_raw(&mut self, ws: &str, n: u64) -> String {
        let base = format!("{{causeloop:v1:ws:{ws}}}");
        let event = format!(
            r#"{{"type":"test.seq","ts":{},"payload":{{"n":{n}}}}}"#,
            now() * 1000
        );
        self.command(&[
            "FCALL",
            "causeloop_publish",
            "2",
            &format!("{base}:meta"),
            &format!("{base}:history"),
            &format!("causeloop:v1:ws:{ws}"),
            "1000",
            "120000",
            &event,
        ])
    }
}

/// The next frame that is not a heartbeat, parsed.
fn next_frame(ws: &mut Ws) -> serde_json::Value {
    json(&read_event(ws))
}

/// Reads until `count` numbered events came; returns them in order with any gap frames seen.
fn read_numbers(ws: &mut Ws, count: usize) -> (Vec<u64>, Vec<serde_json::Value>) {
    let start = Instant::now();
    let (mut got, mut gaps) = (Vec::new(), Vec::new());
    while got.len() < count {
        assert!(
            start.elapsed() < WAIT,
            "only {} of {count}: {got:?}",
            got.len()
        );
        let f = next_frame(ws);
        match f["type"].as_str() {
            Some("test.seq") => got.push(f["payload"]["n"].as_u64().unwrap()),
            Some("stream.gap") => gaps.push(f),
            _ => {}
        }
    }
    (got, gaps)
}

#[test]
fn positions_come_from_redis_and_a_backend_publishes_through_the_function() {
    let Some(redis) =
        Redis::start("positions_come_from_redis_and_a_backend_publishes_through_the_function")
    else {
        return;
    };
    let nodes = [node_v2(&redis), node_v2(&redis)];
    let mut subs: Vec<Ws> = nodes.iter().map(|n| n.subscribe("ws_v2", "u")).collect();
    // Through a node (HTTP), through a node (library), straight from a backend.
    let (status, body) =
        nodes[0].publish(r#"{"workspace_id":"ws_v2","type":"test.seq","payload":{"n":0}}"#);
    assert_eq!(status, 202, "{body}");
    nodes[1]
        .server()
        .publisher()
        .publish("ws_v2", "test.seq", &serde_json::json!({"n": 1}))
        .unwrap();
    let mut backend = Backend::connect(&redis);
    assert_eq!(
        backend.publish("ws_v2", 2),
        ":3",
        "the function answers the offset"
    );
    for s in subs.iter_mut() {
        assert_eq!(read_numbers(s, 3).0, [0, 1, 2]);
    }
    // The history stream holds the three, each with its position.
    let entries = redis.cli(&["XRANGE", "{causeloop:v1:ws:ws_v2}:history", "-", "+"]);
    for (i, id) in ["1-0", "2-0", "3-0"].iter().enumerate() {
        assert!(entries.contains(id), "{entries}");
        assert!(
            entries.contains(&format!(r#""offset":{},"type":"test.seq""#, i + 1)),
            "{entries}"
        );
    }
    let epoch = redis.cli(&["HGET", "{causeloop:v1:ws:ws_v2}:meta", "epoch"]);
    assert!(epoch.trim().parse::<u64>().unwrap() > 0, "{epoch}");
    // A bad call is refused by the function, and nothing is published.
    assert!(backend
        .command(&[
            "FCALL",
            "causeloop_publish",
            "2",
            "{causeloop:v1:ws:ws_v2}:meta",
            "{causeloop:v1:ws:ws_v2}:history",
            "causeloop:v1:ws:ws_v2",
            "0",
            "1000",
            "{}",
        ])
        .starts_with("-ERR causeloop"));
    assert_eq!(
        redis
            .cli(&["HGET", "{causeloop:v1:ws:ws_v2}:meta", "offset"])
            .trim(),
        "3"
    );
}

#[test]
fn a_node_whose_subscription_was_killed_reads_what_it_missed() {
    let Some(redis) = Redis::start("a_node_whose_subscription_was_killed_reads_what_it_missed")
    else {
        return;
    };
    let node = node_v2(&redis);
    let mut sub = node.subscribe("ws_kill", "u");
    // A backend publishes steadily straight to Redis, whatever the node is doing.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut backend = Backend::connect(&redis);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let answer = backend.publish("ws_kill", n);
                assert!(answer.starts_with(':'), "{answer}");
                n += 1;
                sent.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    assert_eq!(read_numbers(&mut sub, 50).0, (0..50).collect::<Vec<_>>());
    // Redis drops the node's subscriber connection (as it does to a subscriber over its output
    // buffer limit); the node reconnects after its backoff, 100 ms or more of events later.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "1", "{killed}");
    let before = sent.load(Ordering::Relaxed);
    assert!(eventually(WAIT, || redis.subscribers("ws_kill") == 1
        && sent.load(Ordering::Relaxed) > before + 100));
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    let total = sent.load(Ordering::Relaxed);
    let (rest, gaps) = read_numbers(&mut sub, total as usize - 50);
    assert!(gaps.is_empty(), "{gaps:?}");
    assert_eq!(
        rest,
        (50..total).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let reads = common::process::metric(
        node.server().internal_addr(),
        "causeloop_bus_stream_reads_total ",
    );
    assert!(reads.is_some_and(|r| r >= 2), "{reads:?}");
}

#[test]
fn a_redis_that_lost_its_data_is_a_gap_for_the_clients_not_silence() {
    let Some(mut redis) =
        Redis::start("a_redis_that_lost_its_data_is_a_gap_for_the_clients_not_silence")
    else {
        return;
    };
    let node = node_v2(&redis);
    let mut sub = node.subscribe("ws_lost", "u");
    let mut backend = Backend::connect(&redis);
    for n in 0..5 {
        backend.publish("ws_lost", n);
    }
    assert_eq!(read_numbers(&mut sub, 5).0, [0, 1, 2, 3, 4]);
    // Restarted without persistence: the epoch and the history are gone.
    redis.kill();
    redis.restart();
    assert!(eventually(WAIT, || redis.subscribers("ws_lost") == 1));
    let mut backend = Backend::connect(&redis);
    assert_eq!(
        backend.publish("ws_lost", 5),
        ":1",
        "a new epoch starts at 1"
    );
    let gap = next_frame(&mut sub);
    assert_eq!(gap["type"], "stream.gap", "{gap}");
    assert_eq!(gap["payload"]["reason"], "history_lost", "{gap}");
    assert!(gap["payload"]["since"].is_string(), "{gap}");
    assert_eq!(read_numbers(&mut sub, 1).0, [5]);
}

#[test]
fn a_client_that_reconnects_to_the_same_node_is_replayed_from_the_redis_positions() {
    let Some(redis) = Redis::start(
        "a_client_that_reconnects_to_the_same_node_is_replayed_from_the_redis_positions",
    ) else {
        return;
    };
    let node = node_v2(&redis);
    let token = token("ws_again", "u", 3600);
    let url = node.url(&token, "ws_again");
    let mut first = connect(&url);
    assert_eq!(next_frame(&mut first)["type"], "connected");
    // A second client keeps the node subscribed while the first is away.
    let mut keeper = node.subscribe("ws_again", "k");
    let mut backend = Backend::connect(&redis);
    for n in 0..3 {
        backend.publish("ws_again", n);
    }
    assert_eq!(read_numbers(&mut first, 3).0, [0, 1, 2]);
    assert_eq!(read_numbers(&mut keeper, 3).0, [0, 1, 2]);
    // The client goes (it closes first).
    first.close(None).unwrap();
    let start = Instant::now();
    while first.read().is_ok() {
        assert!(start.elapsed() < WAIT);
    }
    for n in 3..6 {
        backend.publish("ws_again", n);
    }
    assert_eq!(read_numbers(&mut keeper, 3).0, [3, 4, 5]);
    let mut again = connect(&url);
    assert_eq!(next_frame(&mut again)["type"], "connected");
    let mut got = Vec::new();
    let start = Instant::now();
    while got.last() != Some(&5) {
        assert!(start.elapsed() < WAIT, "{got:?}");
        let f = next_frame(&mut again);
        assert_eq!(f["type"], "test.seq", "{f}");
        got.push(f["payload"]["n"].as_u64().unwrap());
    }
    // The client closed first: its record is its last acknowledgement, so repeats are allowed
    // before 3; nothing after 2 may be missing, nothing may come twice after it.
    let from = got.iter().position(|&n| n == 3).expect("3 replayed");
    assert_eq!(&got[from..], [3, 4, 5]);
}

/// A backend publishing numbered events straight to Redis every `every` until stopped.
struct Steady {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Steady {
    fn start(redis: &Redis, ws: &'static str, every: Duration) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut backend = Backend::connect(redis);
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                backend.publish(ws, n);
                n += 1;
                sent2.store(n, Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Steady {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops it; returns how many it published.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.sent()
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads numbered events into `got` until the server's close frame; returns its code.
fn read_to_close(ws: &mut Ws, got: &mut Vec<u64>) -> u16 {
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < WAIT, "no close within {WAIT:?}");
        match ws.read().expect("read a frame") {
            tungstenite::Message::Text(t) => {
                let f = json(&t);
                if f["type"] == "test.seq" {
                    got.push(f["payload"]["n"].as_u64().unwrap());
                }
                assert_ne!(f["type"], "stream.gap", "{f}");
            }
            tungstenite::Message::Close(Some(c)) => {
                // The answer to the close goes out with the next read; read to the end.
                while ws.read().is_ok() {
                    assert!(start.elapsed() < WAIT, "the server did not close");
                }
                return u16::from(c.code);
            }
            _ => {}
        }
    }
}

#[test]
fn a_client_drained_from_one_node_resumes_on_another_with_nothing_lost() {
    let Some(redis) =
        Redis::start("a_client_drained_from_one_node_resumes_on_another_with_nothing_lost")
    else {
        return;
    };
    let (a, b) = (node_v2(&redis), node_v2(&redis));
    let token = token("ws_move", "u", 3600);
    let mut on_a = connect(&a.url(&token, "ws_move"));
    assert_eq!(next_frame(&mut on_a)["type"], "connected");
    let flow = Steady::start(&redis, "ws_move", Duration::from_millis(2));
    let mut before = read_numbers(&mut on_a, 30).0;
    // Node A drains (SIGTERM): 1001, which the client answers; then it reconnects elsewhere,
    // while the backend goes on publishing. Node B has never served this workspace.
    a.server().shutdown();
    assert_eq!(read_to_close(&mut on_a, &mut before), 1001);
    let published_while_away = flow.sent();
    let mut on_b = connect(&b.url(&token, "ws_move"));
    assert_eq!(next_frame(&mut on_b)["type"], "connected");
    assert!(eventually(WAIT, || flow.sent() > published_while_away + 50));
    let total = flow.stop();
    let (after, gaps) = read_numbers(&mut on_b, (total - before.len() as u64) as usize);
    assert!(gaps.is_empty(), "{gaps:?}");
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    assert_eq!(
        all,
        (0..total).collect::<Vec<_>>(),
        "every event once, in order, across nodes"
    );
    assert!(
        published_while_away > *before.last().unwrap() + 1 || after.len() > 50,
        "the client missed events while it moved"
    );
}
