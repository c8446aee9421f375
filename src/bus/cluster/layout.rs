//! Finding Redis: addresses for host names, and a Redis Cluster's layout.
//!
//! Name resolution (`getaddrinfo`) blocks, so it runs on one helper thread for the whole bus,
//! started once, fed by a bounded channel: a slow DNS answer holds up the connects that need it
//! and nothing else. IP literals (what a Redis Cluster's `CLUSTER SLOTS` names) never go there.
//!
//! The layout is read over an ordinary [`Link`](super::link::Link): the bus thread asks each
//! candidate in turn (the server that said a slot moved, then the known masters, then the seed
//! nodes) and takes the first answer that names an owner for some slot.

use crate::config::RedisNode;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names waiting for the resolver thread, at most. The bus asks for each server once per
/// connect attempt, and a cluster has few: the bound is never reached in practice, and a name
/// that finds it full is asked again on the next attempt.
const QUEUE: usize = 64;

/// How long a resolved address is used before it is asked again: a Redis behind a DNS name
/// that moved (a restarted pod) is found within this.
const TTL: Duration = Duration::from_secs(5);

/// The resolver: asks on its own thread, answers through a channel and the bus's waker.
pub struct Resolver {
    ask: Sender<RedisNode>,
    answers: Receiver<(RedisNode, Result<SocketAddr, String>)>,
    known: HashMap<RedisNode, (SocketAddr, Instant)>,
    asked: Vec<RedisNode>,
}

impl Resolver {
    /// Starts the helper thread; it wakes the bus with `waker` after each answer.
    pub fn start(waker: Arc<Waker>) -> std::io::Result<Resolver> {
        let (ask, questions) = crossbeam_channel::bounded::<RedisNode>(QUEUE);
        let (answer, answers) = crossbeam_channel::bounded(QUEUE);
        std::thread::Builder::new()
            .name("causeloop-bus-dns".into())
            .spawn(move || {
                for node in questions {
                    let got = (node.host.as_str(), node.port)
                        .to_socket_addrs()
                        .map_err(|e| e.to_string())
                        .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()));
                    if answer.send((node, got)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Resolver {
            ask,
            answers,
            known: HashMap::new(),
            asked: Vec::new(),
        })
    }

    /// `node`'s address if known and fresh; otherwise asks for it and gives `None` (the bus is
    /// woken when it is known).
    pub fn address(&mut self, node: &RedisNode, now: Instant) -> Option<SocketAddr> {
        if let Ok(ip) = node.host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Some(SocketAddr::new(ip, node.port));
        }
        if let Some((addr, at)) = self.known.get(node) {
            if now < *at + TTL {
                return Some(*addr);
            }
        }
        if !self.asked.contains(node) {
            match self.ask.try_send(node.clone()) {
                Ok(()) => self.asked.push(node.clone()),
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        }
        None
    }

    /// Takes the answers that arrived; gives the failures, to be reported as failed connects.
    pub fn take_answers(&mut self, now: Instant) -> Vec<(RedisNode, String)> {
        let mut failed = Vec::new();
        while let Ok((node, got)) = self.answers.try_recv() {
            self.asked.retain(|n| *n != node);
            match got {
                Ok(addr) => {
                    self.known.insert(node, (addr, now));
                }
                Err(why) => failed.push((node, why)),
            }
        }
        failed
    }
}

/// A read of a Redis Cluster's layout in progress: the candidates still to ask and why the ones
/// asked did not answer.
pub struct LayoutRead {
    candidates: Vec<RedisNode>,
    next: usize,
    errors: Vec<String>,
}

impl LayoutRead {
    /// Asks `candidates` in order.
    pub fn new(candidates: Vec<RedisNode>) -> LayoutRead {
        LayoutRead {
            candidates,
            next: 0,
            errors: Vec::new(),
        }
    }

    /// The candidate to ask now, if any is left.
    pub fn current(&self) -> Option<&RedisNode> {
        self.candidates.get(self.next)
    }

    /// The current candidate did not answer: go on to the next.
    pub fn failed(&mut self, why: String) {
        if let Some(node) = self.candidates.get(self.next) {
            self.errors.push(format!("{node}: {why}"));
        }
        self.next += 1;
    }

    /// Why no candidate gave the layout.
    pub fn give_up(self) -> String {
        format!(
            "no Redis Cluster node gave its layout ({})",
            self.errors.join("; ")
        )
    }
}
