//! Tenant isolation under churn, randomized: many workspaces and users, workspace-wide and
//! user-scoped events through both publish paths, connections on every shard opening and
//! closing between rounds. Every connection must receive exactly the events addressed to it while
//! it was subscribed, in publish order: nothing missing, nothing extra, nothing from another
//! tenant.
//!
//! The same runs on two nodes sharing a three-master Redis Cluster, with connections and
//! publishes spread over both nodes and a workspace's hash slot moving to another master between
//! rounds: the cluster bus's subscription bookkeeping must keep every connection whole.
//!
//! On one node (history on), and on the Redis Cluster with wire format 2, some connections that
//! left come back with the same token (on the cluster, to either node), as the seed's client
//! does, and resume: they must receive every event addressed to them while they
//! were gone, in order, then the live stream; the only extra frames allowed are a repeat of the
//! last events they had read before leaving (events written after their last acknowledgement,
//! the contract's one case of duplicates).
//!
//! The seed is printed; `CAUSELOOP_TEST_SEED=<n>` replays a run.

mod common;

use common::redis::RedisCluster;
use common::*;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use tungstenite::Message;

/// xorshift64*: enough randomness for a test, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// Names that are prefixes of one another, so a lookup by prefix would leak.
const WORKSPACES: [&str; 6] = ["ws_a", "ws_a2", "ws_b", "ws_b_", "ws_c", "ws_none"];
const USERS: [&str; 4] = ["u1", "u10", "u2", "u_1"];

struct Client {
    ws: Ws,
    token: String,
    workspace: &'static str,
    user: &'static str,
    /// Event ids addressed to it since it subscribed, in publish order, not yet read.
    expected: Vec<u64>,
    /// Ids it read before it last left (a resumed stream may repeat a tail of these).
    read_before: Vec<u64>,
    /// Resumed this round: its first events may repeat a tail of `read_before`.
    resumed: bool,
}

/// `got` is `expected`, after at most a repeat of a tail of `before`.
fn resumed_ok(got: &[u64], expected: &[u64], before: &[u64]) -> Option<usize> {
    let dups = got.len().checked_sub(expected.len())?;
    if &got[dups..] != expected || dups > before.len() {
        return None;
    }
    (got[..dups] == before[before.len() - dups..]).then_some(dups)
}

struct Sent {
    id: u64,
    workspace: &'static str,
    user: Option<&'static str>,
}

/// Reads events until this round's fence; returns the ids of everything before it.
fn read_until_fence(c: &mut Client, round: u64) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        let v = json(&read_event(&mut c.ws));
        match v["type"].as_str() {
            Some("test.fence") if v["payload"]["round"] == round => return got,
            // A resumed connection is replayed the fences of the rounds it missed (and may
            // repeat the last one it read): events like any other, their order checked by the
            // ids around them.
            Some("test.fence") if c.resumed && v["payload"]["round"].as_u64() < Some(round) => {}
            Some("test.fence") => panic!("fence of round {} in round {round}", v["payload"]),
            Some("test.event") => {
                assert_eq!(v["payload"]["ws"], c.workspace, "cross-tenant event: {v}");
                if let Some(u) = v["payload"]["user"].as_str() {
                    assert_eq!(u, c.user, "another user's event: {v}");
                }
                got.push(v["payload"]["id"].as_u64().unwrap());
            }
            other => panic!("unexpected frame type {other:?}: {v}"),
        }
    }
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("CAUSELOOP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() ^ u64::from(std::process::id()) << 20 | 1);
    eprintln!("{test}: seed {seed} (CAUSELOOP_TEST_SEED={seed} replays this run)");
    seed
}

/// What a run checked.
struct Checked {
    deliveries: usize,
    events: u64,
    /// (node, shard) pairs that held connections at some point.
    shards_seen: HashSet<(usize, usize)>,
    /// Connections that came back and resumed.
    resumes: usize,
    /// Events a resumed connection read twice (written after its last acknowledgement).
    repeats: usize,
}

/// `rounds` rounds of churn and events over `nodes`: connections open on random nodes,
/// events go out through random nodes over both publish paths, connections close.
/// `between_rounds` runs before each round's events.
fn churn(
    seed: u64,
    nodes: &[TestServer],
    rounds: u64,
    resume: bool,
    mut between_rounds: impl FnMut(&mut Rng),
) -> Checked {
    let mut rng = Rng(seed);
    let mut clients: Vec<Client> = Vec::new();
    let mut next_id = 0u64;
    let mut shards_seen = HashSet::new();
    let mut checked = 0usize;
    let mut gone: Vec<Client> = Vec::new();
    let mut resumes = 0usize;
    let mut repeats = 0usize;

    for round in 0..rounds {
        // Some connections arrive (the `connected` frame means subscribed).
        for _ in 0..rng.below(6) + usize::from(clients.is_empty()) {
            let workspace = WORKSPACES[rng.below(WORKSPACES.len() - 1)];
            let user = USERS[rng.below(USERS.len())];
            let node = &nodes[rng.below(nodes.len())];
            let token = token(workspace, user, 3600);
            let mut ws = connect(&node.url(&token, workspace));
            let first = read_text(&mut ws);
            assert!(first.starts_with(r#"{"type":"connected""#), "{first}");
            clients.push(Client {
                ws,
                token,
                workspace,
                user,
                expected: Vec::new(),
                read_before: Vec::new(),
                resumed: false,
            });
        }
        // Some that left come back with the same token and resume.
        if resume {
            for _ in 0..rng.below(3) {
                if gone.is_empty() {
                    break;
                }
                let mut c = gone.swap_remove(rng.below(gone.len()));
                // On any node: on the cluster bus its record is in Redis.
                let node = &nodes[rng.below(nodes.len())];
                let mut ws = connect(&node.url(&c.token, c.workspace));
                let first = read_text(&mut ws);
                assert!(first.starts_with(r#"{"type":"connected""#), "{first}");
                c.ws = ws;
                c.resumed = true;
                resumes += 1;
                clients.push(c);
            }
        }
        for (n, node) in nodes.iter().enumerate() {
            for (i, st) in node.server().stats().shards.iter().enumerate() {
                if st.open.load(Ordering::Relaxed) > 0 {
                    shards_seen.insert((n, i));
                }
            }
        }
        between_rounds(&mut rng);

        // A round of events: workspace-wide and user-scoped, over HTTP batches and the library
        // handle, some to a workspace nobody is subscribed to.
        let mut sent = Vec::new();
        for _ in 0..rng.below(40) + 1 {
            let workspace = WORKSPACES[rng.below(WORKSPACES.len())];
            let user = (rng.below(3) == 0).then(|| USERS[rng.below(USERS.len())]);
            sent.push(Sent {
                id: next_id,
                workspace,
                user,
            });
            next_id += 1;
        }
        let mut i = 0;
        while i < sent.len() {
            let n = (rng.below(8) + 1).min(sent.len() - i);
            let chunk = &sent[i..i + n];
            let via = &nodes[rng.below(nodes.len())];
            if rng.below(2) == 0 {
                let items: Vec<String> = chunk
                    .iter()
                    .map(|e| {
                        let payload =
                            serde_json::json!({"id": e.id, "ws": e.workspace, "user": e.user});
                        let mut item = serde_json::json!({
                            "workspace_id": e.workspace, "type": "test.event", "payload": payload,
                        });
                        if let Some(u) = e.user {
                            item["user_id"] = u.into();
                        }
                        item.to_string()
                    })
                    .collect();
                let (status, body) = via.publish(&format!("[{}]", items.join(",")));
                assert_eq!(status, 202, "{body}");
            } else {
                let publisher = via.server().publisher();
                for e in chunk {
                    let payload =
                        serde_json::json!({"id": e.id, "ws": e.workspace, "user": e.user});
                    match e.user {
                        Some(u) => publisher.publish_user(e.workspace, u, "test.event", &payload),
                        None => publisher.publish(e.workspace, "test.event", &payload),
                    }
                    .unwrap();
                }
            }
            i += n;
        }
        for c in clients.iter_mut().chain(gone.iter_mut()) {
            c.expected.extend(
                sent.iter()
                    .filter(|e| e.workspace == c.workspace && e.user.map_or(true, |u| u == c.user))
                    .map(|e| e.id),
            );
        }
        // The fence: one event per workspace, after everything else; per-shard order means a
        // connection that sees it has seen everything published before it.
        let fences: Vec<String> = WORKSPACES
            .iter()
            .map(|w| {
                format!(
                    r#"{{"workspace_id":"{w}","type":"test.fence","payload":{{"round":{round}}}}}"#
                )
            })
            .collect();
        let (status, body) = nodes[0].publish(&format!("[{}]", fences.join(",")));
        assert_eq!(status, 202, "{body}");
        for c in clients.iter_mut() {
            let got = read_until_fence(c, round);
            if c.resumed {
                let Some(dups) = resumed_ok(&got, &c.expected, &c.read_before) else {
                    panic!(
                        "seed {seed}, round {round}: {}/{} resumed with {got:?}, expected {:?} after at most a repeat of the tail of {:?}",
                        c.workspace, c.user, c.expected, c.read_before
                    );
                };
                repeats += dups;
                checked += got.len() - dups;
                c.resumed = false;
                c.read_before.clear();
            } else {
                assert_eq!(
                    got, c.expected,
                    "seed {seed}, round {round}: {}/{} got the wrong events",
                    c.workspace, c.user
                );
                checked += got.len();
            }
            c.read_before.extend(&got);
            c.expected.clear();
        }

        // Some connections leave: most with a close handshake, some by dropping the socket.
        for _ in 0..rng.below(4) {
            if clients.is_empty() {
                break;
            }
            let mut c = clients.swap_remove(rng.below(clients.len()));
            if rng.below(3) == 0 {
                let _ = c.ws.get_ref().shutdown(std::net::Shutdown::Both);
            } else {
                c.ws.close(None).unwrap();
                let start = std::time::Instant::now();
                loop {
                    assert!(start.elapsed() < WAIT, "no close echo within {WAIT:?}");
                    match c.ws.read() {
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            if resume {
                gone.push(c);
            }
        }
    }
    Checked {
        deliveries: checked,
        events: next_id,
        shards_seen,
        resumes,
        repeats,
    }
}

/// Two nodes (two shards each) on `cluster` with wire format `wire` (acknowledgements every
/// 50 ms, so that resumes repeat little), started once each node's bus has reached every master
/// (publishes answer 503 until then).
fn cluster_nodes(cluster: &RedisCluster, wire: u8) -> [TestServer; 2] {
    let nodes = [0, 1].map(|_| {
        let mut bus = cluster.bus();
        if let causeloop_stream::config::BusConfig::Redis(r) = &mut bus {
            r.wire = wire;
        }
        TestServer::with(move |c| {
            c.shards = 2;
            c.bus = bus;
            c.ack_interval = std::time::Duration::from_millis(50);
        })
    });
    for node in &nodes {
        assert!(
            eventually(WAIT, || node
                .server()
                .stats()
                .bus
                .bus_up
                .load(Ordering::Relaxed)
                == 1),
            "a node's cluster bus never came up"
        );
    }
    nodes
}

/// Every other round, one workspace's slot (and its keys) moves to another master; returns how
/// many moved (0 or 1).
fn move_a_slot(cluster: &RedisCluster, rng: &mut Rng) -> usize {
    if rng.below(2) != 0 {
        return 0;
    }
    let ws = WORKSPACES[rng.below(WORKSPACES.len())];
    let slot = cluster.slot(&format!("causeloop:v1:ws:{ws}"));
    let to = (cluster.owner(slot) + 1 + rng.below(2)) % 3;
    cluster.move_slot(slot, to);
    1
}

#[test]
fn every_connection_gets_exactly_its_events_through_churn() {
    let seed = seed("isolation");
    let nodes = [TestServer::with(|c| {
        c.shards = 3;
        c.ack_interval = std::time::Duration::from_millis(50);
    })];
    let run = churn(seed, &nodes, 100, true, |_| {});
    eprintln!(
        "isolation: {} deliveries checked over {} events, {} resumes, {} events repeated",
        run.deliveries, run.events, run.resumes, run.repeats
    );
    assert!(run.resumes > 20, "only {} resumes", run.resumes);
    assert!(
        run.deliveries > 500,
        "only {} deliveries checked",
        run.deliveries
    );
    assert_eq!(
        run.shards_seen.len(),
        3,
        "connections landed on shards {:?} only",
        run.shards_seen
    );
}

#[test]
fn every_connection_gets_exactly_its_events_across_a_redis_cluster_while_slots_move() {
    let Some(cluster) = RedisCluster::start(
        "every_connection_gets_exactly_its_events_across_a_redis_cluster_while_slots_move",
        3,
    ) else {
        return;
    };
    let seed = seed("isolation on a Redis Cluster");
    let nodes = cluster_nodes(&cluster, 1);
    let mut moves = 0;
    let run = churn(seed, &nodes, 40, false, |rng| {
        moves += move_a_slot(&cluster, rng)
    });
    eprintln!(
        "isolation on a Redis Cluster: {} deliveries checked over {} events, {moves} slot moves",
        run.deliveries, run.events
    );
    assert!(
        run.deliveries > 200,
        "only {} deliveries checked",
        run.deliveries
    );
    assert!(moves > 5, "only {moves} slot moves");
    assert_eq!(
        run.shards_seen.len(),
        4,
        "connections landed on (node, shard) {:?} only",
        run.shards_seen
    );
}

#[test]
fn every_connection_gets_exactly_its_events_and_resumes_on_any_node_with_wire_format_2() {
    let Some(cluster) = RedisCluster::start(
        "every_connection_gets_exactly_its_events_and_resumes_on_any_node_with_wire_format_2",
        3,
    ) else {
        return;
    };
    let seed = seed("isolation on a Redis Cluster, wire format 2");
    let nodes = cluster_nodes(&cluster, 2);
    let mut moves = 0;
    let run = churn(seed, &nodes, 40, true, |rng| {
        moves += move_a_slot(&cluster, rng)
    });
    eprintln!(
        "isolation on a Redis Cluster, wire format 2: {} deliveries checked over {} events, {} resumes, {} repeated, {moves} slot moves",
        run.deliveries, run.events, run.resumes, run.repeats
    );
    assert!(run.resumes > 5, "only {} resumes", run.resumes);
    assert!(
        run.deliveries > 200,
        "only {} deliveries checked",
        run.deliveries
    );
    assert!(moves > 5, "only {moves} slot moves");
}
