//! A shard's subscription registry: which of its connections belong to which workspace and user.
//!
//! Add and remove are O(1): each connection's membership (its workspace's slot, its user's name,
//! its positions in the workspace list and in the user list) is kept here, indexed by its slab
//! key, and removal is a `swap_remove` that fixes the moved entry's position. A connection
//! therefore stores no names itself: one shared `Arc<str>` per connection holds its user id (the
//! same allocation serves as the lookup key), and a workspace's name is stored once per shard.
//!
//! A pure core: no I/O, no other thread. [`Registry::add`] says whether the connection is its
//! workspace's first here and [`Registry::remove`] whether it was the last; the shard acts on
//! that (the interest table's bits, the cluster bus's subscriptions).
//!
//! A registry made [`Registry::gated`] (a cluster bus) starts every new workspace not live:
//! until the shard marks it live (the bus confirmed its subscription), it has no recipients:
//! its connections are waiting for their `connected` frame and must not be sent events before
//! it.

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
    name: Arc<str>,
    /// Connections events reach (joined and active).
    conns: Vec<u32>,
    users: HashMap<Arc<str>, Conns>,
    /// Members, active or not: the workspace goes with its last.
    members: u32,
    /// Events may be delivered (always, without a cluster bus).
    live: bool,
    /// Where this shard's live stream of the workspace stands (history on).
    stream: Stream,
}

/// Where a shard's live stream of one workspace stands: the epoch, and the offset of the next
/// event its active connections are to receive. Every active connection of the workspace has
/// been queued every event addressed to it before `next`, and none after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stream {
    /// The epoch (0: no stream yet).
    pub epoch: u64,
    /// The next offset to deliver.
    pub next: u64,
}

/// What a shard does with an event of a workspace whose stream stands at a [`Stream`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Deliver it; the stream has moved past it.
    Deliver,
    /// Deliver the events from offset `from` up to it from the history first, then it: it
    /// came early (two publishers raced between taking positions and reaching this inbox).
    FillThenDeliver {
        /// The first offset to take from the history.
        from: u64,
    },
    /// Delivered already (taken from the history when a later one came first): skip it.
    Skip,
    /// A straggler of an epoch the stream has left: deliver it as it is, the stream unmoved.
    Straggler,
}

impl Stream {
    /// A stream that starts at whatever event comes next (the cluster bus, where Redis assigns
    /// positions and the bus thread delivers each workspace's events in order: a workspace this
    /// shard has not seen, or one whose events the bus could not give in full).
    pub const UNKNOWN: Stream = Stream { epoch: 0, next: 0 };

    /// Where an event at `pos` stands against this stream, which moves past it.
    pub fn admit(&mut self, pos: crate::history::Position) -> Admit {
        if *self == Stream::UNKNOWN {
            *self = Stream {
                epoch: pos.epoch,
                next: pos.offset + 1,
            };
            return Admit::Deliver;
        }
        if pos.epoch < self.epoch {
            return Admit::Straggler;
        }
        if pos.epoch > self.epoch {
            *self = Stream {
                epoch: pos.epoch,
                next: 1,
            };
        }
        if pos.offset < self.next {
            return Admit::Skip;
        }
        let from = self.next;
        self.next = pos.offset + 1;
        if pos.offset > from {
            Admit::FillThenDeliver { from }
        } else {
            Admit::Deliver
        }
    }
}

/// Marks a member not in the recipient lists yet.
const INACTIVE: u32 = u32::MAX;

struct Member {
    workspace: u32,
    in_workspace: u32,
    in_user: u32,
    user: Arc<str>,
}

/// What [`Registry::remove`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// The connection was not subscribed.
    NotSubscribed,
    /// Unsubscribed; its workspace still has connections here.
    Member,
    /// Unsubscribed, and it was the last of its workspace here (named).
    LastInWorkspace(Box<str>),
}

/// The registry of one shard.
pub struct Registry {
    by_name: HashMap<Box<str>, u32>,
    workspaces: Slab<Workspace>,
    members: Vec<Option<Member>>,
    /// New workspaces start not live (see the module docs).
    gated: bool,
}

impl Registry {
    /// An empty registry whose workspaces are live at once (one node, the local bus).
    pub fn new() -> Self {
        Registry {
            by_name: HashMap::new(),
            workspaces: Slab::new(),
            members: Vec::new(),
            gated: false,
        }
    }

    /// An empty registry whose workspaces wait to be marked live ([`Registry::set_live`]).
    pub fn gated() -> Self {
        Registry {
            gated: true,
            ..Registry::new()
        }
    }

    /// Subscribes connection `key` as `user` of `workspace`; returns whether it is the
    /// workspace's first connection here. The caller adds each key once and removes it before
    /// adding it again.
    pub fn add(&mut self, key: usize, workspace: &str, user: &str) -> bool {
        let first = self.join(key, workspace, user);
        self.activate(key);
        first
    }

    /// Makes connection `key` a member of `workspace` as `user` without making it a recipient
    /// yet (it is being replayed what it missed; [`Registry::activate`] ends that). Returns
    /// whether it is the workspace's first member here.
    pub fn join(&mut self, key: usize, workspace: &str, user: &str) -> bool {
        if self.members.len() <= key {
            self.members.resize_with(key + 1, || None);
        }
        debug_assert!(self.members[key].is_none(), "key added twice");
        let (slot, first) = match self.by_name.get(workspace) {
            Some(&slot) => (slot, false),
            None => {
                let slot = self.workspaces.insert(Workspace {
                    name: workspace.into(),
                    conns: Vec::new(),
                    users: HashMap::new(),
                    members: 0,
                    live: !self.gated,
                    stream: Stream::default(),
                }) as u32;
                self.by_name.insert(workspace.into(), slot);
                (slot, true)
            }
        };
        let ws = &mut self.workspaces[slot as usize];
        ws.members += 1;
        // One allocation per user name per workspace: a second connection shares the first's.
        let user = match ws.users.get_key_value(user) {
            Some((name, _)) => name.clone(),
            None => user.into(),
        };
        self.members[key] = Some(Member {
            workspace: slot,
            in_workspace: INACTIVE,
            in_user: INACTIVE,
            user,
        });
        first
    }

    /// Makes a member a recipient: events of its workspace (and of its user) reach it from now
    /// on. Does nothing for an active member or a key that is not one.
    pub fn activate(&mut self, key: usize) {
        let Some(m) = self.members.get_mut(key).and_then(Option::as_mut) else {
            return;
        };
        if m.in_workspace != INACTIVE {
            return;
        }
        let ws = &mut self.workspaces[m.workspace as usize];
        m.in_workspace = ws.conns.len() as u32;
        ws.conns.push(key as u32);
        m.in_user = match ws.users.get_mut(&*m.user) {
            Some(conns @ Conns::One(_)) => {
                let Conns::One(first) = *conns else {
                    unreachable!()
                };
                *conns = Conns::Many(vec![first, key as u32]);
                1
            }
            Some(Conns::Many(v)) => {
                v.push(key as u32);
                v.len() as u32 - 1
            }
            None => {
                ws.users.insert(m.user.clone(), Conns::One(key as u32));
                0
            }
        };
    }

    /// Whether connection `key` is a member that events do not reach yet.
    pub fn is_pending(&self, key: usize) -> bool {
        self.members
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|m| m.in_workspace == INACTIVE)
    }

    /// Unsubscribes connection `key`.
    pub fn remove(&mut self, key: usize) -> Removed {
        let Some(m) = self.members.get_mut(key).and_then(Option::take) else {
            return Removed::NotSubscribed;
        };
        let ws = &mut self.workspaces[m.workspace as usize];
        ws.members -= 1;
        if m.in_workspace != INACTIVE {
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
        }
        if ws.members == 0 {
            debug_assert!(ws.conns.is_empty());
            let ws = self.workspaces.remove(m.workspace as usize);
            self.by_name.remove(&*ws.name);
            return Removed::LastInWorkspace((*ws.name).into());
        }
        Removed::Member
    }

    /// Where this shard's stream of `workspace` stands, to move it on (a workspace with a
    /// member here only).
    pub fn stream_mut(&mut self, workspace: &str) -> Option<&mut Stream> {
        let slot = *self.by_name.get(workspace)?;
        Some(&mut self.workspaces[slot as usize].stream)
    }

    /// Where the stream of member `key`'s workspace stands.
    pub fn stream_of(&self, key: usize) -> Option<Stream> {
        let m = self.members.get(key)?.as_ref()?;
        Some(self.workspaces[m.workspace as usize].stream)
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
    pub fn set_live(&mut self, workspace: &str) -> &[u32] {
        let Some(&slot) = self.by_name.get(workspace) else {
            return &[];
        };
        let ws = &mut self.workspaces[slot as usize];
        if std::mem::replace(&mut ws.live, true) {
            return &[];
        }
        &ws.conns
    }

    /// The name of member `key`'s workspace, shared (no allocation).
    pub fn workspace_of(&self, key: usize) -> Option<Arc<str>> {
        let m = self.members.get(key)?.as_ref()?;
        Some(self.workspaces[m.workspace as usize].name.clone())
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

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
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
    fn add_remove_keeps_lists_consistent_and_reports_first_and_last() {
        let mut r = Registry::new();
        assert!(r.add(0, "ws_a", "u1"));
        assert!(!r.add(1, "ws_a", "u2"));
        assert!(!r.add(2, "ws_a", "u1"));
        assert!(r.add(3, "ws_b", "u1"));
        assert_eq!(sorted(r.recipients("ws_a", None)), vec![0, 1, 2]);
        assert_eq!(sorted(r.recipients("ws_a", Some("u1"))), vec![0, 2]);
        assert_eq!(sorted(r.recipients("ws_b", Some("u1"))), vec![3]);
        assert!(r.recipients("ws_b", Some("u2")).is_empty());
        assert_eq!(r.names(2), Some(("ws_a", "u1")));
        assert_eq!(r.remove(0), Removed::Member);
        assert_eq!(r.remove(0), Removed::NotSubscribed);
        assert_eq!(sorted(r.recipients("ws_a", None)), vec![1, 2]);
        assert_eq!(sorted(r.recipients("ws_a", Some("u1"))), vec![2]);
        assert_eq!(r.remove(2), Removed::Member);
        assert_eq!(r.remove(1), Removed::LastInWorkspace("ws_a".into()));
        assert!(r.recipients("ws_a", None).is_empty());
        assert_eq!(r.workspace_count(), 1);
        assert_eq!(r.names(1), None);
        // The same workspace again is a first again.
        assert!(r.add(1, "ws_a", "u2"));
    }

    use crate::history::Position;
    use proptest::prelude::*;

    proptest! {
        /// Events of one epoch reach a shard in any order (each may arrive up to `window`
        /// places late): what the shard delivers, filling from a history that has every
        /// event, is every offset exactly once, in order.
        #[test]
        fn the_seam_delivers_every_offset_once_in_order_whatever_the_arrival_order(
            n in 1u64..200,
            delays in proptest::collection::vec(0usize..8, 200),
        ) {
            let mut arrivals: Vec<(usize, u64)> = (1..=n)
                .map(|o| (o as usize + delays[o as usize - 1], o))
                .collect();
            arrivals.sort();
            let mut stream = Stream { epoch: 5, next: 1 };
            let mut delivered = Vec::new();
            for (_, o) in arrivals {
                match stream.admit(Position { epoch: 5, offset: o }) {
                    Admit::Deliver => delivered.push(o),
                    Admit::FillThenDeliver { from } => {
                        delivered.extend(from..o);
                        delivered.push(o);
                    }
                    Admit::Skip => {}
                    Admit::Straggler => prop_assert!(false, "one epoch has no stragglers"),
                }
            }
            prop_assert_eq!(delivered, (1..=n).collect::<Vec<_>>());
            prop_assert_eq!(stream.next, n + 1);
        }
    }

    #[test]
    fn a_new_epoch_starts_the_stream_over_and_the_old_ones_stragglers_pass_as_they_are() {
        let mut s = Stream { epoch: 5, next: 10 };
        let at = |epoch, offset| Position { epoch, offset };
        assert_eq!(s.admit(at(5, 10)), Admit::Deliver);
        assert_eq!(s.admit(at(7, 3)), Admit::FillThenDeliver { from: 1 });
        assert_eq!(s, Stream { epoch: 7, next: 4 });
        assert_eq!(s.admit(at(5, 11)), Admit::Straggler);
        assert_eq!(s.admit(at(7, 2)), Admit::Skip);
        assert_eq!(s, Stream { epoch: 7, next: 4 });
        // A shard whose workspace had no stream yet (epoch 0) takes the first it sees.
        let mut fresh = Stream::default();
        assert_eq!(fresh.admit(at(9, 1)), Admit::Deliver);
    }

    #[test]
    fn a_pending_member_keeps_its_workspace_but_receives_nothing_until_activated() {
        let mut r = Registry::new();
        assert!(r.join(3, "ws", "u"));
        assert!(r.is_pending(3));
        assert!(r.recipients("ws", None).is_empty());
        assert!(r.recipients("ws", Some("u")).is_empty());
        assert!(!r.add(5, "ws", "u"));
        assert_eq!(sorted(r.recipients("ws", Some("u"))), vec![5]);
        r.stream_mut("ws").unwrap().next = 9;
        assert_eq!(r.stream_of(3).map(|s| s.next), Some(9));
        r.activate(3);
        r.activate(3);
        assert!(!r.is_pending(3));
        assert_eq!(sorted(r.recipients("ws", Some("u"))), vec![3, 5]);
        assert_eq!(r.remove(5), Removed::Member);
        assert!(r.join(7, "other", "u"));
        assert_eq!(r.remove(7), Removed::LastInWorkspace("other".into()));
        assert_eq!(r.remove(3), Removed::LastInWorkspace("ws".into()));
        assert!(r.stream_mut("ws").is_none());
    }

    #[test]
    fn a_gated_workspace_has_no_recipients_until_it_is_live() {
        let mut r = Registry::gated();
        r.add(4, "ws", "u");
        r.add(6, "ws", "v");
        assert!(r.recipients("ws", None).is_empty());
        assert!(!r.is_live("ws"));
        assert_eq!(sorted(r.set_live("ws")), vec![4, 6]);
        assert!(r.set_live("ws").is_empty(), "live once");
        assert_eq!(sorted(r.recipients("ws", None)), vec![4, 6]);
    }

    #[test]
    fn randomized_against_a_model() {
        let mut r = Registry::new();
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
            if let Some((w, _)) = model.remove(&key) {
                let last = !model.values().any(|(mw, _)| *mw == w);
                let want = if last {
                    Removed::LastInWorkspace(w.into())
                } else {
                    Removed::Member
                };
                assert_eq!(r.remove(key), want);
            } else {
                let w = format!("ws_{}", rnd(7));
                let u = format!("u_{}", rnd(5));
                let first = !model.values().any(|(mw, _)| *mw == w);
                assert_eq!(r.add(key, &w, &u), first);
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
