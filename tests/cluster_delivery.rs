//! Nothing lost across nodes (`--bus-wire 2`), with real Redis, real nodes and a real
//! WebSocket client: positions assigned by the Redis function, a backend publishing through the
//! function itself (a raw RESP connection, as any language's client would), a node whose
//! subscription Redis killed reading what it missed from the workspace's history stream, and a
//! Redis that lost its data telling the clients with `stream.gap`.

mod common;

use common::redis::{Redis, RedisCluster};
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        Backend::at(redis.port)
    }

    fn at(port: u16) -> Backend {
        Backend::try_at(port).expect("connect to redis")
    }

    fn try_at(port: u16) -> Option<Backend> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        Some(Backend {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        })
    }

    fn command(&mut self, args: &[&str]) -> String {
        self.try_command(args).expect("redis answers")
    }

    /// The answer's first line, or `None` if the connection failed.
    fn try_command(&mut self, args: &[&str]) -> Option<String> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(out.as_bytes()).ok()?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim_end().to_string()),
            _ => None,
        }
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

/// Reads numbered events until `last` has come; every frame but heartbeats must be one.
fn read_through(ws: &mut Ws, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    let start = Instant::now();
    while got.last() != Some(&last) {
        assert!(start.elapsed() < WAIT, "{got:?}");
        let f = next_frame(ws);
        assert_eq!(f["type"], "test.seq", "{f}");
        got.push(f["payload"]["n"].as_u64().unwrap());
    }
    got
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
    let got = read_through(&mut again, 5);
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

/// A backend on a Redis Cluster, as a cluster-aware client behaves: it follows `MOVED`, sends
/// `ASKING` before a command an `ASK` sends elsewhere, and asks again after `TRYAGAIN` (a slot
/// whose keys are moving), until the function has taken the event.
struct ClusterBackend {
    conns: std::collections::HashMap<u16, Backend>,
    seed: u16,
    /// Numbers whose call was cut off before Redis answered: published again, so possibly
    /// twice (the at-least-once of any client that retries).
    ambiguous: Vec<u64>,
}

impl ClusterBackend {
    fn new(cluster: &RedisCluster) -> ClusterBackend {
        ClusterBackend {
            conns: std::collections::HashMap::new(),
            seed: cluster.nodes[0].port,
            ambiguous: Vec::new(),
        }
    }

    /// Publishes `{"src":src,"n":n}` to `ws` through `causeloop_spublish`; returns the offset.
    fn publish(&mut self, ws: &str, src: &str, n: u64) -> u64 {
        let base = key_base(ws);
        let event = format!(
            r#"{{"type":"test.seq","ts":{},"payload":{{"src":"{src}","n":{n}}}}}"#,
            now() * 1000
        );
        let args = [
            "FCALL".to_string(),
            "causeloop_spublish".into(),
            "2".into(),
            format!("{base}:meta"),
            format!("{base}:history"),
            format!("causeloop:v1:ws:{ws}"),
            "1000".into(),
            "120000".into(),
            event,
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut port, mut asking) = (self.seed, false);
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < WAIT,
                "the cluster kept refusing the publish"
            );
            if let std::collections::hash_map::Entry::Vacant(e) = self.conns.entry(port) {
                match Backend::try_at(port) {
                    Some(b) => {
                        e.insert(b);
                    }
                    None => {
                        // A master that is down: ask again, as a client retries.
                        std::thread::sleep(Duration::from_millis(10));
                        port = self.seed;
                        continue;
                    }
                }
            }
            let c = self.conns.get_mut(&port).expect("inserted above");
            if asking && c.try_command(&["ASKING"]).as_deref() != Some("+OK") {
                self.conns.remove(&port);
                continue;
            }
            let Some(answer) = c.try_command(&args) else {
                self.conns.remove(&port);
                self.ambiguous.push(n);
                continue;
            };
            if let Some(offset) = answer.strip_prefix(':') {
                return offset.parse().unwrap();
            }
            let words: Vec<&str> = answer.split_whitespace().collect();
            asking = false;
            match words.first().copied() {
                Some("-MOVED") | Some("-ASK") => {
                    asking = words[0] == "-ASK";
                    port = words[2].rsplit(':').next().unwrap().parse().unwrap();
                }
                // A slot whose keys are moving, or one whose master is down: again shortly.
                Some("-TRYAGAIN") | Some("-CLUSTERDOWN") => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => panic!("{answer}"),
            }
        }
    }
}

/// Publishes `{"src":"backend","n":n}` to every workspace of `spaces` (n the same for each),
/// one round every `every`, straight to the cluster, until `stop`; the thread returns how many
/// rounds it published and the numbers that may have gone out twice.
fn backend_rounds(
    cluster: &RedisCluster,
    spaces: Vec<String>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<u64>)> {
    let mut backend = ClusterBackend::new(cluster);
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            for ws in &spaces {
                backend.publish(ws, "backend", n);
            }
            n += 1;
            std::thread::sleep(every);
        }
        (n, backend.ambiguous)
    })
}

/// The keys' hash tag of a workspace (its channel, which has no braces here).
fn key_base(ws: &str) -> String {
    format!("{{causeloop:v1:ws:{ws}}}")
}

/// Reads events until every source in `want` has reached its count; checks that each
/// source's numbers come once and in order (a number its publisher may have published twice,
/// in `repeats`, may come twice).
fn read_sources_allowing(ws: &mut Ws, want: &[(&str, u64)], repeats: &[u64]) {
    let mut next: std::collections::HashMap<String, u64> =
        want.iter().map(|(s, _)| (s.to_string(), 0)).collect();
    let start = Instant::now();
    while want.iter().any(|(s, n)| next[*s] < *n) {
        assert!(start.elapsed() < WAIT, "only {next:?} of {want:?}");
        let f = next_frame(ws);
        assert_ne!(f["type"], "stream.gap", "{f}");
        if f["type"] != "test.seq" {
            continue;
        }
        let src = f["payload"]["src"].as_str().unwrap().to_string();
        let n = f["payload"]["n"].as_u64().unwrap();
        let expected = next.get_mut(&src).unwrap();
        if *expected > 0 && n == *expected - 1 && repeats.contains(&n) {
            continue;
        }
        assert_eq!(n, *expected, "{src}: once each, in order");
        *expected += 1;
    }
}

fn cluster_node_v2(cluster: &RedisCluster) -> TestServer {
    let mut bus = cluster.bus();
    if let causeloop_stream::config::BusConfig::Redis(r) = &mut bus {
        r.wire = 2;
    }
    TestServer::with(move |c| {
        c.bus = bus;
        c.heartbeat_interval = Duration::from_millis(200);
    })
}

#[test]
fn slots_moved_with_their_keys_under_steady_publishing_lose_nothing() {
    let Some(cluster) = RedisCluster::start(
        "slots_moved_with_their_keys_under_steady_publishing_lose_nothing",
        3,
    ) else {
        return;
    };
    let (a, b) = (cluster_node_v2(&cluster), cluster_node_v2(&cluster));
    let ws = cluster.one_workspace_per_master()[0].clone();
    let slot = cluster.slot(&format!("causeloop:v1:ws:{ws}"));
    let mut subs = [a.subscribe(&ws, "u"), b.subscribe(&ws, "u")];
    let stop = Arc::new(AtomicBool::new(false));
    // Two publishers at once: a node (HTTP, retrying a 503 as a backend would) and a backend
    // calling the function straight on the cluster.
    let via_node = {
        let (stop, url) = (stop.clone(), a.internal);
        let ws = ws.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"workspace_id":"{ws}","type":"test.seq","payload":{{"src":"node","n":{n}}}}}"#
                );
                let (status, _) = publish_with_key(url, Some(PUBLISH_KEY), &body);
                if status == 202 {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    let direct = backend_rounds(
        &cluster,
        vec![ws.clone()],
        Duration::from_millis(2),
        stop.clone(),
    );
    let from = cluster.owner(slot);
    for step in 1..=4 {
        std::thread::sleep(Duration::from_millis(150));
        cluster.move_slot(slot, (from + step) % 3);
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::Relaxed);
    let (sent_node, (sent_direct, repeats)) = (via_node.join().unwrap(), direct.join().unwrap());
    assert!(
        sent_node > 20 && sent_direct > 20,
        "{sent_node} {sent_direct}"
    );
    for s in subs.iter_mut() {
        read_sources_allowing(
            s,
            &[("node", sent_node), ("backend", sent_direct)],
            &repeats,
        );
    }
    // The history moved with the slot, and its positions went on without a new epoch.
    let owner = cluster.owner(slot);
    let meta = cluster.nodes[owner].cli(&["HGET", &format!("{}:meta", key_base(&ws)), "offset"]);
    assert_eq!(
        meta.trim().parse::<u64>().unwrap(),
        sent_node + sent_direct + repeats.len() as u64
    );
}

#[test]
fn a_master_killed_and_restarted_loses_nothing_it_took() {
    let Some(mut cluster) =
        RedisCluster::start("a_master_killed_and_restarted_loses_nothing_it_took", 3)
    else {
        return;
    };
    let (a, b) = (cluster_node_v2(&cluster), cluster_node_v2(&cluster));
    let spaces = cluster.one_workspace_per_master();
    let ws = spaces[0].clone();
    let owner = cluster.owner(cluster.slot(&format!("causeloop:v1:ws:{ws}")));
    let mut subs = [a.subscribe(&ws, "u"), b.subscribe(&ws, "u")];
    let stop = Arc::new(AtomicBool::new(false));
    // A backend publishing straight to the cluster: it gets through the moment the master is
    // back, before any node has subscribed there again.
    let publisher = backend_rounds(
        &cluster,
        vec![ws.clone()],
        Duration::from_millis(2),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(200));
    cluster.kill(owner);
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart(owner);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (sent, repeats) = publisher.join().unwrap();
    for s in subs.iter_mut() {
        read_sources_allowing(s, &[("backend", sent)], &repeats);
    }
}

#[test]
fn a_rolling_restart_of_three_nodes_loses_nothing_for_any_client() {
    let Some(cluster) = RedisCluster::start(
        "a_rolling_restart_of_three_nodes_loses_nothing_for_any_client",
        3,
    ) else {
        return;
    };
    let spaces = cluster.one_workspace_per_master();
    let mut nodes: Vec<TestServer> = (0..3).map(|_| cluster_node_v2(&cluster)).collect();
    // Six clients, two per node, on workspaces of every master; each keeps its token.
    let clients: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                spaces[i % 3].clone(),
                token(&spaces[i % 3], &format!("u{i}"), 3600),
            )
        })
        .collect();
    let mut at: Vec<usize> = (0..6).map(|i| i % 3).collect();
    let mut socks: Vec<Ws> = clients
        .iter()
        .zip(&at)
        .map(|((ws, t), &n)| {
            let mut s = connect(&nodes[n].url(t, ws));
            assert_eq!(next_frame(&mut s)["type"], "connected");
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = backend_rounds(
        &cluster,
        spaces.clone(),
        Duration::from_millis(3),
        stop.clone(),
    );
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); 6];
    for restarting in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        // SIGTERM: the node drains (1001 to each connection); its clients reconnect, with
        // the same token, to the next node, as the seed's client does through a balancer.
        nodes[restarting].server().shutdown();
        for c in 0..6 {
            if at[c] != restarting {
                continue;
            }
            let mut numbers = Vec::new();
            assert_eq!(read_to_close(&mut socks[c], &mut numbers), 1001);
            got[c].extend(numbers);
            at[c] = (restarting + 1) % 3;
            let (ws, t) = &clients[c];
            socks[c] = connect(&nodes[at[c]].url(t, ws));
            assert_eq!(next_frame(&mut socks[c])["type"], "connected");
        }
        // The node comes back (a new process: new ports, nothing kept in memory).
        nodes[restarting] = cluster_node_v2(&cluster);
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::Relaxed);
    let (sent, repeats) = publisher.join().unwrap();
    assert!(repeats.is_empty(), "no master failed: {repeats:?}");
    for c in 0..6 {
        let mut rest = Vec::new();
        let start = Instant::now();
        while got[c].len() + rest.len() < sent as usize {
            assert!(
                start.elapsed() < WAIT,
                "client {c}: {} of {sent}",
                got[c].len() + rest.len()
            );
            let f = next_frame(&mut socks[c]);
            assert_ne!(f["type"], "stream.gap", "client {c}: {f}");
            if f["type"] == "test.seq" {
                rest.push(f["payload"]["n"].as_u64().unwrap());
            }
        }
        got[c].extend(rest);
        assert_eq!(
            got[c],
            (0..sent).collect::<Vec<_>>(),
            "client {c}: every event once, in order"
        );
    }
}

#[test]
fn redis_killed_and_restarted_with_persistence_loses_nothing() {
    let Some(mut redis) =
        Redis::start_persistent("redis_killed_and_restarted_with_persistence_loses_nothing")
    else {
        return;
    };
    let (a, b) = (node_v2(&redis), node_v2(&redis));
    let mut subs = [a.subscribe("ws_aof", "u"), b.subscribe("ws_aof", "u")];
    let stop = Arc::new(AtomicBool::new(false));
    // Through node B over HTTP, resending what was refused as a publisher does. A publish
    // refused while Redis died under it may have been taken all the same: its resend may then
    // arrive twice (the 503's documented caveat), and only those may.
    let publisher = {
        let (stop, url) = (stop.clone(), b.internal);
        std::thread::spawn(move || {
            let (mut n, mut repeats) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"workspace_id":"ws_aof","type":"test.seq","payload":{{"src":"node","n":{n}}}}}"#
                );
                match publish_with_key(url, Some(PUBLISH_KEY), &body).0 {
                    202 => n += 1,
                    _ => repeats.push(n),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (n, repeats)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    redis.kill();
    std::thread::sleep(Duration::from_millis(300));
    redis.restart();
    assert!(eventually(WAIT, || redis.subscribers("ws_aof") == 2));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (sent, repeats) = publisher.join().unwrap();
    for s in subs.iter_mut() {
        read_sources_allowing(s, &[("node", sent)], &repeats);
    }
    // The epoch survived the restart: no client was told of a gap (checked above), and the
    // offsets went on.
    let offset = redis.cli(&["HGET", "{causeloop:v1:ws:ws_aof}:meta", "offset"]);
    assert!(offset.trim().parse::<u64>().unwrap() >= sent, "{offset}");
}

#[test]
fn a_record_made_while_redis_was_away_is_kept_once_it_is_back() {
    let Some(mut redis) =
        Redis::start_persistent("a_record_made_while_redis_was_away_is_kept_once_it_is_back")
    else {
        return;
    };
    let (a, b) = (node_v2(&redis), node_v2(&redis));
    let token = token("ws_away", "u", 3600);
    let mut first = connect(&a.url(&token, "ws_away"));
    assert_eq!(next_frame(&mut first)["type"], "connected");
    let mut backend = Backend::connect(&redis);
    for n in 0..5 {
        backend.publish("ws_away", n);
    }
    assert_eq!(read_numbers(&mut first, 5).0, [0, 1, 2, 3, 4]);
    redis.kill();
    // The client leaves while node A cannot reach Redis: its record waits on the node.
    first.close(None).unwrap();
    let start = Instant::now();
    while first.read().is_ok() {
        assert!(start.elapsed() < WAIT);
    }
    redis.restart();
    let up = |n: &TestServer| n.server().stats().bus.bus_up.load(Ordering::Relaxed) == 1;
    assert!(eventually(WAIT, || up(&a) && up(&b)));
    let mut backend = Backend::connect(&redis);
    for n in 5..10 {
        backend.publish("ws_away", n);
    }
    // Node A hands the record to Redis as soon as it is back.
    let key = format!(
        "{{causeloop:v1:ws:ws_away}}:resume:{}",
        causeloop_stream::history::records::record_key(token.as_bytes(), "ws_away")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert!(eventually(WAIT, || redis.cli(&["LLEN", &key]).trim() == "1"));
    let mut again = connect(&b.url(&token, "ws_away"));
    assert_eq!(next_frame(&mut again)["type"], "connected");
    let got = read_through(&mut again, 9);
    // Its record came from its acknowledgement: what it had may come again, then 5..9, once.
    let from = got.iter().position(|&n| n == 5).expect("5 replayed");
    assert_eq!(&got[from..], [5, 6, 7, 8, 9]);
}

#[test]
fn a_node_away_longer_than_the_history_reaches_tells_its_clients_where_events_are_missing() {
    let Some(redis) = Redis::start(
        "a_node_away_longer_than_the_history_reaches_tells_its_clients_where_events_are_missing",
    ) else {
        return;
    };
    let node = node_v2(&redis);
    let mut sub = node.subscribe("ws_short", "u");
    let mut backend = Backend::connect(&redis);
    let publish = |b: &mut Backend, n: u64| {
        // The history the function keeps for this workspace: the last 5 events.
        let base = "{causeloop:v1:ws:ws_short}";
        let event = format!(
            r#"{{"type":"test.seq","ts":{},"payload":{{"n":{n}}}}}"#,
            now() * 1000
        );
        let answer = b.command(&[
            "FCALL",
            "causeloop_publish",
            "2",
            &format!("{base}:meta"),
            &format!("{base}:history"),
            "causeloop:v1:ws:ws_short",
            "5",
            "120000",
            &event,
        ]);
        assert!(answer.starts_with(':'), "{answer}");
    };
    for n in 0..3 {
        publish(&mut backend, n);
    }
    assert_eq!(read_numbers(&mut sub, 3).0, [0, 1, 2]);
    // The node loses its subscription; 30 events go out before it is back (its reconnect
    // backoff is 100 ms at least), and the stream keeps only the last 5 of them.
    assert_eq!(redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).trim(), "1");
    for n in 3..33 {
        publish(&mut backend, n);
    }
    let gap = next_frame(&mut sub);
    assert_eq!(gap["type"], "stream.gap", "{gap}");
    assert_eq!(gap["payload"]["reason"], "history_trimmed", "{gap}");
    assert!(
        gap["payload"]["since"].is_string(),
        "the ts of event 2: {gap}"
    );
    // Then what the stream still had, in order, and the live stream.
    assert_eq!(read_numbers(&mut sub, 5).0, [28, 29, 30, 31, 32]);
    publish(&mut backend, 33);
    assert_eq!(read_numbers(&mut sub, 1).0, [33]);
    let gaps = common::process::metric(node.internal, "causeloop_bus_stream_gaps_total ");
    assert_eq!(gaps, Some(1));
}
