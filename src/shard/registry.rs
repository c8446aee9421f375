//! A shard's subscription registry: which of its connections belong to which workspace and user.
//!
//! Add and remove are O(1): each connection's membership (its workspace's slot, its user's name,
//! its positions in the workspace list and in the user list) is kept here, indexed by its slab
//! key, and removal is a `swap_remove` that fixes the moved entry's position. A connection
//! therefore stores no names itself: one shared `Arc<str>` per connection holds its user id (the
//! same allocation serves as the lookup key), and a workspace's name is stored once per shard.
//!
//! The registry also keeps this shard's per-bucket counts and flips its bits in the shared
//! [`Interest`] table when a bucket gains its first or loses its last subscribed workspace.
//!
//! With a cluster bus, a workspace's first connection on this shard asks the bus to subscribe
//! ([`BusInterest::Add`]) and its last one leaving lets go ([`BusInterest::Remove`]). Until the
//! bus reports the subscription live, the workspace has no recipients: its connections are
//! waiting for their `connected` frame and must not be sent events before it.

use crate::bus::cluster::{BusInterest, ClusterBus};
use crate::bus::interest::{bucket, Interest, BUCKETS};
use slab::Slab;
use std::collections::HashMap;
use std::sync::Arc;

/// The connections of one user in one workspace; one connection needs no allocation.
enum Conns {
    One(u32),
    Many(Vec<u32>),
}

impl Conns {
    fn as_slice(&self) -> &[u32] {
        match self {
            Conns::One(k) => std::slice::from_ref(k),
            Conns::Many(v) => v,
        }
    }
}

struct Workspace {
    name: Box<str>,
    conns: Vec<u32>,
    users: HashMap<Arc<str>, Conns>,
    /// Events may be delivered (always, without a cluster bus).
    live: bool,
}

struct Member {
    workspace: u32,
    in_workspace: u32,
    in_user: u32,
    user: Arc<str>,
}

/// The registry of one shard.
pub struct Registry {
    by_name: HashMap<Box<str>, u32>,
    workspaces: Slab<Workspace>,
    members: Vec<Option<Member>>,
    bucket_counts: Box<[u32]>,
    interest: Arc<Interest>,
    shard: usize,
    bus: Option<Arc<ClusterBus>>,
}

impl Registry {
    /// An empty registry for shard `shard`, publishing its interest into `interest`.
    pub fn new(shard: usize, interest: Arc<Interest>) -> Self {
        Self::with_bus(shard, interest, None)
    }

    /// Like [`Registry::new`], also telling `bus` (when there is one) which workspaces this
    /// shard serves.
    pub fn with_bus(shard: usize, interest: Arc<Interest>, bus: Option<Arc<ClusterBus>>) -> Self {
        Registry {
            by_name: HashMap::new(),
            workspaces: Slab::new(),
            members: Vec::new(),
            bucket_counts: vec![0; BUCKETS].into_boxed_slice(),
            interest,
            shard,
            bus,
        }
    }

    /// Subscribes connection `key` as `user` of `workspace`. The caller adds each key once and
    /// removes it before adding it again.
    pub fn add(&mut self, key: usize, workspace: &str, user: &str) {
        if self.members.len() <= key {
            self.members.resize_with(key + 1, || None);
        }
        debug_assert!(self.members[key].is_none(), "key added twice");
        let slot = match self.by_name.get(workspace) {
            Some(&slot) => slot,
            None => {
                let b = bucket(workspace);
                self.bucket_counts[b] += 1;
                if self.bucket_counts[b] == 1 {
                    self.interest.set(b, self.shard);
                }
                if let Some(bus) = &self.bus {
                    bus.interest(BusInterest::Add(workspace.into(), self.shard));
                }
                let slot = self.workspaces.insert(Workspace {
                    name: workspace.into(),
                    conns: Vec::new(),
                    users: HashMap::new(),
                    live: self.bus.is_none(),
                }) as u32;
                self.by_name.insert(workspace.into(), slot);
                slot
            }
        };
        let ws = &mut self.workspaces[slot as usize];
        let in_workspace = ws.conns.len() as u32;
        ws.conns.push(key as u32);
        let (user, in_user) = match ws.users.get_key_value(user) {
            Some((name, _)) => {
                let name = name.clone();
                let conns = ws.users.get_mut(user).expect("just found");
                let in_user = match conns {
                    Conns::One(first) => {
                        *conns = Conns::Many(vec![*first, key as u32]);
                        1
                    }
                    Conns::Many(v) => {
                        v.push(key as u32);
                        v.len() as u32 - 1
                    }
                };
                (name, in_user)
            }
            None => {
                let name: Arc<str> = user.into();
                ws.users.insert(name.clone(), Conns::One(key as u32));
                (name, 0)
            }
        };
        self.members[key] = Some(Member {
            workspace: slot,
            in_workspace,
            in_user,
            user,
        });
    }

    /// Unsubscribes connection `key`. Returns false if it was not subscribed.
    pub fn remove(&mut self, key: usize) -> bool {
        let Some(m) = self.members.get_mut(key).and_then(Option::take) else {
            return false;
        };
        let ws = &mut self.workspaces[m.workspace as usize];
        let i = m.in_workspace as usize;
        debug_assert_eq!(ws.conns.get(i), Some(&(key as u32)));
        ws.conns.swap_remove(i);
        if let Some(&moved) = ws.conns.get(i) {
            if let Some(mm) = self.members[moved as usize].as_mut() {
                mm.in_workspace = i as u32;
            }
        }
        let mut user_gone = false;
        if let Some(conns) = ws.users.get_mut(&*m.user) {
            match conns {
                Conns::One(_) => user_gone = true,
                Conns::Many(v) => {
                    let j = m.in_user as usize;
                    debug_assert_eq!(v.get(j), Some(&(key as u32)));
                    v.swap_remove(j);
                    if let Some(&moved) = v.get(j) {
                        if let Some(mm) = self.members[moved as usize].as_mut() {
                            mm.in_user = j as u32;
                        }
                    }
                    if v.len() == 1 {
                        let last = v[0];
                        *conns = Conns::One(last);
                        if let Some(mm) = self.members[last as usize].as_mut() {
                            mm.in_user = 0;
                        }
                    }
                }
            }
        }
        if user_gone {
            ws.users.remove(&*m.user);
        }
        if ws.conns.is_empty() {
            let ws = self.workspaces.remove(m.workspace as usize);
            if let Some(bus) = &self.bus {
                bus.interest(BusInterest::Remove((*ws.name).into(), self.shard));
            }
            self.by_name.remove(&*ws.name);
            let b = bucket(&ws.name);
            self.bucket_counts[b] -= 1;
            if self.bucket_counts[b] == 0 {
                self.interest.clear(b, self.shard);
            }
        }
        true
    }

    /// The connections of `workspace` (of `user` in it, when given) that events may reach:
    /// none while the cluster bus has not confirmed the workspace.
    pub fn recipients(&self, workspace: &str, user: Option<&str>) -> &[u32] {
        let Some(&slot) = self.by_name.get(workspace) else {
            return &[];
        };
        let ws = &self.workspaces[slot as usize];
        if !ws.live {
            return &[];
        }
        match user {
            None => &ws.conns,
            Some(u) => ws.users.get(u).map_or(&[][..], Conns::as_slice),
        }
    }

    /// Whether events of `workspace` reach its connections here (see the module docs).
    pub fn is_live(&self, workspace: &str) -> bool {
        self.by_name
            .get(workspace)
            .is_some_and(|&slot| self.workspaces[slot as usize].live)
    }

    /// Marks `workspace` live; returns its connections (all of them were waiting), or nothing if
    /// it has none here any more or was live already.
    pub fn set_live(&mut self, workspace: &str) -> Vec<u32> {
        let Some(&slot) = self.by_name.get(workspace) else {
            return Vec::new();
        };
        let ws = &mut self.workspaces[slot as usize];
        if std::mem::replace(&mut ws.live, true) {
            return Vec::new();
        }
        ws.conns.clone()
    }

    /// The workspace and user of a subscribed connection (for logs).
    pub fn names(&self, key: usize) -> Option<(&str, &str)> {
        let m = self.members.get(key)?.as_ref()?;
        Some((&self.workspaces[m.workspace as usize].name, &m.user))
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
        assert_eq!(r.names(2), Some(("ws_a", "u1")));
        assert!(r.remove(0));
        assert!(!r.remove(0));
        assert_eq!(sorted(r.recipients("ws_a", None)), vec![1, 2]);
        assert_eq!(sorted(r.recipients("ws_a", Some("u1"))), vec![2]);
        assert!(r.remove(2));
        assert!(r.remove(1));
        assert!(r.recipients("ws_a", None).is_empty());
        assert!(!interest.shards_for("ws_a").contains(2));
        assert_eq!(r.workspace_count(), 1);
        assert_eq!(r.names(1), None);
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
            if model.remove(&key).is_some() {
                assert!(r.remove(key));
            } else {
                let w = format!("ws_{}", rnd(7));
                let u = format!("u_{}", rnd(5));
                r.add(key, &w, &u);
                model.insert(key, (w, u));
            }
        }
        for (k, (w, u)) in &model {
            assert_eq!(r.names(*k), Some((w.as_str(), u.as_str())));
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
