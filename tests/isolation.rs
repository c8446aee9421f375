//! Tenant isolation under churn, randomized: many workspaces and users, workspace-wide and
//! user-scoped events through both publish paths, connections on every shard opening and
//! closing between rounds. Every connection must receive exactly the events addressed to it while
//! it was subscribed, in publish order: nothing missing, nothing extra, nothing from another
//! tenant.
//!
//! The seed is printed; `CAUSELOOP_TEST_SEED=<n>` replays a run.

mod common;

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
    workspace: &'static str,
    user: &'static str,
    /// Event ids addressed to it since it subscribed, in publish order, not yet read.
    expected: Vec<u64>,
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

#[test]
fn every_connection_gets_exactly_its_events_through_churn() {
    let seed = std::env::var("CAUSELOOP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() ^ u64::from(std::process::id()) << 20 | 1);
    eprintln!("isolation: seed {seed} (CAUSELOOP_TEST_SEED={seed} replays this run)");
    let mut rng = Rng(seed);
    let s = TestServer::with(|c| c.shards = 3);
    let publisher = s.server().publisher();
    let mut clients: Vec<Client> = Vec::new();
    let mut next_id = 0u64;
    let mut shards_seen = HashSet::new();
    let mut checked = 0usize;

    for round in 0..100u64 {
        // Some connections arrive (the `connected` frame means subscribed).
        for _ in 0..rng.below(6) + usize::from(clients.is_empty()) {
            let workspace = WORKSPACES[rng.below(WORKSPACES.len() - 1)];
            let user = USERS[rng.below(USERS.len())];
            let ws = s.subscribe(workspace, user);
            clients.push(Client {
                ws,
                workspace,
                user,
                expected: Vec::new(),
            });
        }
        for (i, st) in s.server().shared().shard_stats.iter().enumerate() {
            if st.open.load(Ordering::Relaxed) > 0 {
                shards_seen.insert(i);
            }
        }

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
                let (status, body) = s.publish(&format!("[{}]", items.join(",")));
                assert_eq!(status, 202, "{body}");
            } else {
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
        for c in clients.iter_mut() {
            c.expected.extend(
                sent.iter()
                    .filter(|e| e.workspace == c.workspace && e.user.is_none_or(|u| u == c.user))
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
        assert_eq!(s.publish(&format!("[{}]", fences.join(","))).0, 202);
        for c in clients.iter_mut() {
            let got = read_until_fence(c, round);
            assert_eq!(
                got, c.expected,
                "seed {seed}, round {round}: {}/{} got the wrong events",
                c.workspace, c.user
            );
            checked += got.len();
            c.expected.clear();
        }

        // Some connections leave: most with a close handshake, some by dropping the socket.
        for _ in 0..rng.below(4) {
            if clients.is_empty() {
                break;
            }
            let mut c = clients.swap_remove(rng.below(clients.len()));
            if rng.below(3) == 0 {
                drop(c);
            } else {
                c.ws.close(None).unwrap();
                loop {
                    match c.ws.read() {
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
        }
    }
    eprintln!("isolation: {checked} deliveries checked over {next_id} events");
    assert!(checked > 500, "only {checked} deliveries checked");
    assert_eq!(
        shards_seen.len(),
        3,
        "connections landed on shards {shards_seen:?} only"
    );
}
