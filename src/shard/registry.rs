//! A shard's subscription registry: which of its connections belong to which workspace and user.
//!
//! Add and remove are O(1): each connection's positions in its workspace list and user list are
//! kept beside it (indexed by its slab key), and removal is a `swap_remove` that fixes the moved
//! entry's position. The registry also keeps this shard's per-bucket counts and flips its bits in
//! the shared [`Interest`] table when a bucket gains its first or loses its last subscriber.

use crate::bus::interest::{bucket, Interest, BUCKETS};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
struct Workspace {
    conns: Vec<u32>,
    users: HashMap<Box<str>, Vec<u32>>,
}

#[derive(Clone, Copy, Default)]
struct Position {
    in_workspace: u32,
    in_user: u32,
}

/// The registry of one shard.
pub struct Registry {
    workspaces: HashMap<Box<str>, Workspace>,
    positions: Vec<Position>,
    bucket_counts: Box<[u32]>,
    interest: Arc<Interest>,
    shard: usize,
}

impl Registry {
    /// An empty registry for shard `shard`, publishing its interest into `interest`.
    pub fn new(shard: usize, interest: Arc<Interest>) -> Self {
        Registry {
            workspaces: HashMap::new(),
            positions: Vec::new(),
            bucket_counts: vec![0; BUCKETS].into_boxed_slice(),
            interest,
            shard,
        }
    }

    /// Subscribes connection `key` as `user` of `workspace`. The caller adds each key once.
    pub fn add(&mut self, key: usize, workspace: &str, user: &str) {
        if self.positions.len() <= key {
            self.positions.resize(key + 1, Position::default());
        }
        let ws = match self.workspaces.get_mut(workspace) {
            Some(ws) => ws,
            None => {
                let b = bucket(workspace);
                self.bucket_counts[b] += 1;
                if self.bucket_counts[b] == 1 {
                    self.interest.set(b, self.shard);
                }
                self.workspaces.entry(workspace.into()).or_default()
            }
        };
        let in_workspace = ws.conns.len() as u32;
        ws.conns.push(key as u32);
        let users = match ws.users.get_mut(user) {
            Some(u) => u,
            None => ws.users.entry(user.into()).or_default(),
        };
        let in_user = users.len() as u32;
        users.push(key as u32);
        self.positions[key] = Position {
            in_workspace,
            in_user,
        };
    }

    /// Unsubscribes connection `key`, previously added with the same workspace and user.
    pub fn remove(&mut self, key: usize, workspace: &str, user: &str) {
        let Some(ws) = self.workspaces.get_mut(workspace) else {
            debug_assert!(false, "remove of an unknown workspace");
            return;
        };
        let pos = self.positions[key];
        let i = pos.in_workspace as usize;
        debug_assert_eq!(ws.conns.get(i), Some(&(key as u32)));
        ws.conns.swap_remove(i);
        if let Some(&moved) = ws.conns.get(i) {
            self.positions[moved as usize].in_workspace = i as u32;
        }
        if let Some(users) = ws.users.get_mut(user) {
            let j = pos.in_user as usize;
            debug_assert_eq!(users.get(j), Some(&(key as u32)));
            users.swap_remove(j);
            if let Some(&moved) = users.get(j) {
                self.positions[moved as usize].in_user = j as u32;
            }
            if users.is_empty() {
                ws.users.remove(user);
            }
        }
        if ws.conns.is_empty() {
            self.workspaces.remove(workspace);
            let b = bucket(workspace);
            self.bucket_counts[b] -= 1;
            if self.bucket_counts[b] == 0 {
                self.interest.clear(b, self.shard);
            }
        }
    }

    /// The connections of `workspace` (of `user` in it, when given).
    pub fn recipients(&self, workspace: &str, user: Option<&str>) -> &[u32] {
        let Some(ws) = self.workspaces.get(workspace) else {
            return &[];
        };
        match user {
            None => &ws.conns,
            Some(u) => ws.users.get(u).map_or(&[][..], |v| &v[..]),
        }
    }

    /// Number of workspaces with at least one connection on this shard.
    pub fn workspace_count(&self) -> usize {
        self.workspaces.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(s: &[u32]) -> Vec<u32> {
        let mut v = s.to_vec();
        v.sort();
        v
    }

    #[test]
    fn add_remove_keeps_lists_and_interest_consistent() {
        let interest = Arc::new(Interest::default());
        let mut r = Registry::new(2, interest.clone());
        r.add(0, "ws_a", "u1");
        r.add(1, "ws_a", "u2");
        r.add(2, "ws_a", "u1");
        r.add(3, "ws_b", "u1");
        assert!(interest.shards_for("ws_a").contains(2));
        assert_eq!(sorted(r.recipients("ws_a", None)), vec![0, 1, 2]);
        assert_eq!(sorted(r.recipients("ws_a", Some("u1"))), vec![0, 2]);
        assert_eq!(sorted(r.recipients("ws_b", Some("u1"))), vec![3]);
        assert!(r.recipients("ws_b", Some("u2")).is_empty());
        r.remove(0, "ws_a", "u1");
        assert_eq!(sorted(r.recipients("ws_a", None)), vec![1, 2]);
        assert_eq!(sorted(r.recipients("ws_a", Some("u1"))), vec![2]);
        r.remove(2, "ws_a", "u1");
        r.remove(1, "ws_a", "u2");
        assert!(r.recipients("ws_a", None).is_empty());
        assert!(!interest.shards_for("ws_a").contains(2));
        assert_eq!(r.workspace_count(), 1);
    }

    #[test]
    fn randomized_against_a_model() {
        let interest = Arc::new(Interest::default());
        let mut r = Registry::new(0, interest.clone());
        let mut model: HashMap<usize, (String, String)> = HashMap::new();
        let mut seed = 12345u64;
        let mut rnd = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..20_000 {
            let key = rnd(200) as usize;
            if let Some((w, u)) = model.remove(&key) {
                r.remove(key, &w, &u);
            } else {
                let w = format!("ws_{}", rnd(7));
                let u = format!("u_{}", rnd(5));
                r.add(key, &w, &u);
                model.insert(key, (w, u));
            }
        }
        for w in 0..7 {
            let ws = format!("ws_{w}");
            let want: Vec<u32> = {
                let mut v: Vec<u32> = model
                    .iter()
                    .filter(|(_, (mw, _))| *mw == ws)
                    .map(|(k, _)| *k as u32)
                    .collect();
                v.sort();
                v
            };
            assert_eq!(sorted(r.recipients(&ws, None)), want);
            assert_eq!(interest.shards_for(&ws).contains(0), !want.is_empty());
            for u in 0..5 {
                let us = format!("u_{u}");
                let mut want_u: Vec<u32> = model
                    .iter()
                    .filter(|(_, (mw, mu))| *mw == ws && *mu == us)
                    .map(|(k, _)| *k as u32)
                    .collect();
                want_u.sort();
                assert_eq!(sorted(r.recipients(&ws, Some(&us))), want_u);
            }
        }
    }
}
