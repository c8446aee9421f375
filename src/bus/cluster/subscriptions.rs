//! The subscription protocol of the Redis bus as a pure state machine: which workspaces this
//! node must be subscribed to, on which connection, and when a subscription is in force. It
//! does no I/O; the bus thread feeds it what happened (a shard's first or last subscriber, a
//! reply from Redis, a lost connection) and carries out the [`Action`]s it asks for.
//!
//! Redis answers the commands of one connection in order, one reply per `(S)SUBSCRIBE` or
//! `(S)UNSUBSCRIBE` of one channel (a confirmation, or an error such as `MOVED`), and may push
//! other things in between: messages, and on a Redis Cluster a `sunsubscribe` of its own when a
//! slot moves. So the machine keeps, per connection, the commands sent and not answered yet, in
//! order: a confirmation that matches the oldest is its answer, an error answers the oldest, and
//! an `unsubscribe` that matches nothing is Redis ending the subscription unasked.
//!
//! Per workspace it keeps the shards that want it, the connection its commands went to, whether
//! Redis holds its subscription there (as of the last reply read) and how many of its commands
//! are unanswered. Nothing is decided while a command is unanswered; once none is, the
//! workspace settles:
//!
//! - wanted and held: **live**: messages are delivered and the shards told ([`Action::Live`])
//!   so their waiting connections get `connected`;
//! - wanted and not held: **pending** until its server has a ready connection, then subscribed;
//! - held and no longer wanted: unsubscribed;
//! - neither: forgotten.
//!
//! A subscription Redis ends unasked is reported ([`Action::Ended`]) so the bus reads the layout
//! and subscribes at the new master.

use crate::dispatch::interest::ShardSet;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A connection of the bus thread (its slab key).
pub type LinkId = usize;

/// A subscription command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `SUBSCRIBE`/`SSUBSCRIBE`.
    Subscribe,
    /// `UNSUBSCRIBE`/`SUNSUBSCRIBE`.
    Unsubscribe,
}

/// A confirmation from Redis: `[kind, channel, count]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// `subscribe`/`ssubscribe`.
    Subscribed,
    /// `unsubscribe`/`sunsubscribe` (asked for, or Redis ending it).
    Unsubscribed,
}

impl Confirmation {
    fn answers(self, command: Command) -> bool {
        matches!(
            (self, command),
            (Confirmation::Subscribed, Command::Subscribe)
                | (Confirmation::Unsubscribed, Command::Unsubscribe)
        )
    }
}

/// What the bus thread must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `command` for the workspace on the connection.
    Send(LinkId, Command, Arc<str>),
    /// The subscription is in force: tell these shards.
    Live(Arc<str>, ShardSet),
    /// Redis ended the subscription on this connection unasked (a Redis Cluster moved its
    /// slot): read the layout; the workspace is pending again.
    Ended(LinkId, Arc<str>),
}

#[derive(Default, Debug)]
struct Want {
    shards: ShardSet,
    /// The connection its commands went to (where its subscription is, if held).
    link: Option<LinkId>,
    /// Redis holds the subscription on `link`, as of the last reply read.
    held: bool,
    /// Its commands on `link` not answered yet.
    in_flight: u32,
    /// The shards were told it is live, and nothing has undone that since.
    live: bool,
}

/// Every workspace this node's shards want, and its subscription.
#[derive(Default)]
pub struct Subscriptions {
    wants: HashMap<Arc<str>, Want>,
    /// Wanted, not held, nothing in flight: waiting for a connection to its server. A set: a
    /// workspace retried many times while Redis is away is in it once.
    pending: HashSet<Arc<str>>,
    /// Per connection, the commands sent and not answered yet, oldest first.
    sent: HashMap<LinkId, VecDeque<(Command, Arc<str>)>>,
}

impl Subscriptions {
    /// Shard `shard` got its first subscriber of `ws`.
    pub fn add(&mut self, ws: Arc<str>, shard: usize, out: &mut Vec<Action>) {
        let w = self.wants.entry(ws.clone()).or_default();
        if w.shards.contains(shard) {
            return;
        }
        w.shards.insert(shard);
        if w.live {
            let mut one = ShardSet::default();
            one.insert(shard);
            out.push(Action::Live(ws, one));
        } else {
            self.settle(&ws, out);
        }
    }

    /// Shard `shard` lost its last subscriber of `ws`.
    pub fn remove(&mut self, ws: &str, shard: usize, out: &mut Vec<Action>) {
        let Some((ws, w)) = self.wants.get_key_value(ws) else {
            return;
        };
        let ws = ws.clone();
        if !w.shards.contains(shard) {
            return;
        }
        let w = self.wants.get_mut(&ws).expect("present above");
        w.shards.remove(shard);
        if w.shards.is_empty() {
            w.live = false;
        }
        self.settle(&ws, out);
    }

    /// Decides what `ws` needs, once none of its commands is unanswered (see the module's text).
    fn settle(&mut self, ws: &Arc<str>, out: &mut Vec<Action>) {
        let Some(w) = self.wants.get_mut(ws) else {
            return;
        };
        if w.in_flight > 0 {
            return;
        }
        match (!w.shards.is_empty(), w.held) {
            (true, true) => {
                self.pending.remove(ws);
                if !w.live {
                    w.live = true;
                    out.push(Action::Live(ws.clone(), w.shards));
                }
            }
            (true, false) => {
                w.live = false;
                w.link = None;
                self.pending.insert(ws.clone());
            }
            (false, true) => {
                let link = w.link.expect("a held subscription has its connection");
                w.live = false;
                w.in_flight += 1;
                self.pending.remove(ws);
                self.sent
                    .entry(link)
                    .or_default()
                    .push_back((Command::Unsubscribe, ws.clone()));
                out.push(Action::Send(link, Command::Unsubscribe, ws.clone()));
            }
            (false, false) => {
                self.pending.remove(ws);
                self.wants.remove(ws);
            }
        }
    }

    /// Subscribes every pending workspace that `route` gives a ready connection for; the rest
    /// stay pending.
    pub fn subscribe_pending(
        &mut self,
        mut route: impl FnMut(&str) -> Option<LinkId>,
        out: &mut Vec<Action>,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let (wants, sent) = (&mut self.wants, &mut self.sent);
        self.pending.retain(|ws| {
            let Some(w) = wants.get_mut(ws) else {
                return false;
            };
            if w.shards.is_empty() || w.held || w.in_flight > 0 {
                return false; // settled otherwise, or to be when its replies come
            }
            let Some(link) = route(ws) else {
                return true;
            };
            w.link = Some(link);
            w.in_flight = 1;
            sent.entry(link)
                .or_default()
                .push_back((Command::Subscribe, ws.clone()));
            out.push(Action::Send(link, Command::Subscribe, ws.clone()));
            false
        });
    }

    /// Redis sent a confirmation for `ws` on `link`: the answer to the oldest command sent
    /// there if it matches it, otherwise (an `unsubscribe`) Redis ending the subscription.
    pub fn confirmed(&mut self, link: LinkId, kind: Confirmation, ws: &str, out: &mut Vec<Action>) {
        let queue = self.sent.get_mut(&link);
        let answers = queue
            .as_ref()
            .and_then(|q| q.front())
            .is_some_and(|(c, w)| &**w == ws && kind.answers(*c));
        if answers {
            let (_, ws) = queue.and_then(VecDeque::pop_front).expect("checked");
            if let Some(w) = self.wants.get_mut(&ws) {
                debug_assert_eq!(w.link, Some(link));
                w.in_flight = w.in_flight.saturating_sub(1);
                w.held = kind == Confirmation::Subscribed;
            }
            self.settle(&ws, out);
            return;
        }
        if kind == Confirmation::Subscribed {
            return; // answers nothing sent: nothing to learn
        }
        let Some((ws, w)) = self.wants.get_key_value(ws) else {
            return;
        };
        if w.link != Some(link) || !w.held {
            return; // about a subscription this connection no longer holds
        }
        let ws = ws.clone();
        let w = self.wants.get_mut(&ws).expect("present above");
        w.held = false;
        w.live = false;
        out.push(Action::Ended(link, ws.clone()));
        self.settle(&ws, out);
    }

    /// Redis answered the oldest command sent on `link` with an error (on a Redis Cluster,
    /// `MOVED`: the slot is elsewhere): that command did nothing. Returns the workspace it was
    /// for, or `None` if no command was waiting for an answer (the error answers something
    /// else, which the caller treats as a broken connection).
    pub fn refused(&mut self, link: LinkId, out: &mut Vec<Action>) -> Option<Arc<str>> {
        let (command, ws) = self.sent.get_mut(&link)?.pop_front()?;
        if let Some(w) = self.wants.get_mut(&ws) {
            w.in_flight = w.in_flight.saturating_sub(1);
            if command == Command::Unsubscribe {
                w.held = false;
            }
        }
        self.settle(&ws, out);
        Some(ws)
    }

    /// Connection `link` is gone, and with it every subscription made on it and every answer
    /// owed on it: the workspaces still wanted become pending, the rest are forgotten.
    pub fn lost(&mut self, link: LinkId, out: &mut Vec<Action>) {
        self.sent.remove(&link);
        let on_link: Vec<Arc<str>> = self
            .wants
            .iter_mut()
            .filter(|(_, w)| w.link == Some(link))
            .map(|(ws, w)| {
                w.held = false;
                w.in_flight = 0;
                w.live = false;
                ws.clone()
            })
            .collect();
        for ws in on_link {
            self.settle(&ws, out);
        }
    }

    /// Makes every wanted workspace that waits for nothing pending (a new layout: try again).
    pub fn retry_unrequested(&mut self) {
        for (ws, w) in &self.wants {
            if !w.held && w.in_flight == 0 && !w.shards.is_empty() {
                self.pending.insert(ws.clone());
            }
        }
    }

    /// The shared name of a workspace tracked here.
    pub fn name(&self, ws: &str) -> Option<Arc<str>> {
        self.wants.get_key_value(ws).map(|(k, _)| k.clone())
    }

    /// Whether some shard still wants `ws`.
    pub fn is_wanted(&self, ws: &str) -> bool {
        self.wants.get(ws).is_some_and(|w| !w.shards.is_empty())
    }

    /// Whether messages of `ws` are delivered.
    pub fn is_live(&self, ws: &str) -> bool {
        self.wants.get(ws).is_some_and(|w| w.live)
    }

    /// Workspaces wanted and not subscribed yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Workspaces tracked (wanted, or with a command in flight).
    pub fn len(&self) -> usize {
        self.wants.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.wants.is_empty()
    }
}

/// Runs the state machine against a model of Redis, driven by `ops` (each byte one step), and
/// panics if an invariant breaks. For the fuzz target and the property test.
///
/// The model has two connections, each with its queue of commands Redis has not run yet and its
/// queue of confirmations not yet read; connections can be lost and slots moved at any step.
/// Checked at every step: the shards are told a workspace is live only while Redis holds its
/// subscription, or has ended it in a reply the bus has not read yet. Checked at the end, once every queue has been
/// run: every wanted workspace is subscribed exactly once and live, and nothing unwanted is
/// subscribed or tracked.
#[doc(hidden)]
pub fn exercise(ops: &[u8]) {
    const LINKS: usize = 2;
    const WORKSPACES: [&str; 3] = ["a", "b", "c"];
    #[derive(Default)]
    struct Redis {
        up: bool,
        commands: std::collections::VecDeque<(Command, Arc<str>)>,
        replies: std::collections::VecDeque<(Option<Confirmation>, Arc<str>)>,
        subscribed: HashSet<Arc<str>>,
    }
    let mut redis: Vec<Redis> = (0..LINKS)
        .map(|_| Redis {
            up: true,
            ..Redis::default()
        })
        .collect();
    let mut subs = Subscriptions::default();
    let mut wanted: HashMap<&str, ShardSet> = HashMap::new();
    let mut out = Vec::new();
    // Which connection a workspace's server is on (a slot move changes it).
    let mut home: HashMap<&str, usize> = WORKSPACES.iter().map(|w| (*w, 0)).collect();

    fn apply(out: &mut Vec<Action>, redis: &mut [Redis]) {
        for a in out.drain(..) {
            match a {
                Action::Send(link, cmd, ws) => {
                    assert!(redis[link].up, "a command for a connection that is down");
                    redis[link].commands.push_back((cmd, ws));
                }
                Action::Live(ws, shards) => {
                    assert!(!shards.is_empty());
                    // Redis holds the subscription, or has ended it and said so in a reply
                    // the bus has not read yet (a slot moved right after the confirmation):
                    // the bus cannot know sooner, and that reply makes it pending again.
                    assert!(
                        redis.iter().any(|r| r.subscribed.contains(&ws)
                            || r.replies.iter().any(|(c, w)| {
                                *c == Some(Confirmation::Unsubscribed) && *w == ws
                            })),
                        "{ws} reported live while Redis holds no subscription for it"
                    );
                }
                Action::Ended(..) => {}
            }
        }
    }

    /// Redis runs one command: a subscribe at a server that does not own the slot is refused
    /// with `MOVED` (the `None` reply).
    fn run(r: &mut Redis, link: usize, home: &HashMap<&str, usize>, cmd: Command, ws: Arc<str>) {
        match cmd {
            Command::Subscribe if home[&*ws] != link => r.replies.push_back((None, ws)),
            Command::Subscribe => {
                r.subscribed.insert(ws.clone());
                r.replies.push_back((Some(Confirmation::Subscribed), ws));
            }
            Command::Unsubscribe => {
                r.subscribed.remove(&ws);
                r.replies.push_back((Some(Confirmation::Unsubscribed), ws));
            }
        }
    }

    /// The bus reads one reply, as the bus thread does: a `MOVED` answers the oldest command.
    fn read(
        subs: &mut Subscriptions,
        link: usize,
        reply: Option<Confirmation>,
        ws: &str,
        out: &mut Vec<Action>,
    ) {
        match reply {
            Some(kind) => subs.confirmed(link, kind, ws, out),
            None => {
                let refused = subs.refused(link, out);
                assert_eq!(
                    refused.as_deref(),
                    Some(ws),
                    "an error answers the oldest command"
                );
            }
        }
    }

    for &op in ops {
        let ws = WORKSPACES[usize::from(op >> 4) % WORKSPACES.len()];
        let shard = usize::from((op >> 2) & 1);
        let link = usize::from((op >> 3) & 1);
        match op & 7 {
            0 | 1 => {
                let set = wanted.entry(ws).or_default();
                if !set.contains(shard) {
                    set.insert(shard);
                    subs.add(ws.into(), shard, &mut out);
                }
            }
            2 => {
                if let Some(set) = wanted.get_mut(ws).filter(|s| s.contains(shard)) {
                    set.remove(shard);
                    subs.remove(ws, shard, &mut out);
                }
            }
            3 => {
                // Redis runs the next command on `link`.
                let r = &mut redis[link];
                if let Some((cmd, ws)) = r.commands.pop_front() {
                    run(r, link, &home, cmd, ws);
                }
            }
            4 => {
                // The bus reads the next confirmation on `link`.
                if let Some((reply, ws)) = redis[link].replies.pop_front() {
                    read(&mut subs, link, reply, &ws, &mut out);
                }
            }
            5 => {
                // The connection is lost, and comes back at once (empty).
                redis[link] = Redis {
                    up: true,
                    ..Redis::default()
                };
                subs.lost(link, &mut out);
            }
            6 => {
                // The slot of `ws` moves to the other connection's server: Redis ends the
                // subscription where it was.
                let from = home[ws];
                home.insert(ws, 1 - from);
                let r = &mut redis[from];
                if r.subscribed.remove(ws) {
                    r.replies
                        .push_back((Some(Confirmation::Unsubscribed), ws.into()));
                }
            }
            _ => {
                subs.subscribe_pending(|w| Some(home[w]), &mut out);
            }
        }
        apply(&mut out, &mut redis);
    }
    // Quiesce: run every queue until nothing changes.
    for _ in 0..64 {
        subs.subscribe_pending(|w| Some(home[w]), &mut out);
        apply(&mut out, &mut redis);
        let mut moved = false;
        for link in 0..LINKS {
            while let Some((cmd, ws)) = redis[link].commands.pop_front() {
                moved = true;
                run(&mut redis[link], link, &home, cmd, ws);
            }
            while let Some((reply, ws)) = redis[link].replies.pop_front() {
                moved = true;
                read(&mut subs, link, reply, &ws, &mut out);
                apply(&mut out, &mut redis);
            }
        }
        if !moved && subs.pending() == 0 {
            break;
        }
    }
    for ws in WORKSPACES {
        let want = wanted.get(ws).is_some_and(|s| !s.is_empty());
        let held: Vec<usize> = (0..LINKS)
            .filter(|&l| redis[l].subscribed.contains(ws))
            .collect();
        if want {
            assert_eq!(
                held,
                vec![home[ws]],
                "{ws} is wanted: one subscription, at its server"
            );
            assert!(
                subs.is_live(ws),
                "{ws} is wanted and subscribed but not live"
            );
        } else {
            // A subscription left at a server that no longer owns the slot is harmless (Redis
            // ends it), but one at the workspace's own server would carry unwanted traffic.
            assert!(
                !held.contains(&home[ws]),
                "{ws} is not wanted but still subscribed"
            );
            assert!(!subs.is_live(ws));
        }
    }
    let tracked = WORKSPACES
        .iter()
        .filter(|w| wanted.get(*w).is_some_and(|s| !s.is_empty()))
        .count();
    assert_eq!(subs.len(), tracked, "only wanted workspaces stay tracked");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shards(of: &[usize]) -> ShardSet {
        let mut s = ShardSet::default();
        for &i in of {
            s.insert(i);
        }
        s
    }

    #[test]
    fn first_interest_subscribes_and_the_confirmation_makes_it_live_for_every_shard() {
        let mut subs = Subscriptions::default();
        let mut out = Vec::new();
        subs.add("a".into(), 0, &mut out);
        subs.add("a".into(), 1, &mut out);
        assert!(out.is_empty());
        assert_eq!(subs.pending(), 1);
        subs.subscribe_pending(|_| None, &mut out);
        assert!(out.is_empty(), "no connection: stays pending");
        subs.subscribe_pending(|_| Some(7), &mut out);
        assert_eq!(out, vec![Action::Send(7, Command::Subscribe, "a".into())]);
        out.clear();
        assert!(!subs.is_live("a"));
        subs.confirmed(7, Confirmation::Subscribed, "a", &mut out);
        assert_eq!(out, vec![Action::Live("a".into(), shards(&[0, 1]))]);
        out.clear();
        // A third shard is told at once.
        subs.add("a".into(), 2, &mut out);
        assert_eq!(out, vec![Action::Live("a".into(), shards(&[2]))]);
    }

    /// Workspace "a" wanted by shard 0 and live on connection 1.
    fn a_live_on_link_1() -> (Subscriptions, Vec<Action>) {
        let mut subs = Subscriptions::default();
        let mut out = Vec::new();
        subs.add("a".into(), 0, &mut out);
        subs.subscribe_pending(|_| Some(1), &mut out);
        subs.confirmed(1, Confirmation::Subscribed, "a", &mut out);
        assert!(subs.is_live("a"));
        out.clear();
        (subs, out)
    }

    #[test]
    fn last_interest_unsubscribes_and_a_return_meanwhile_subscribes_again() {
        let (mut subs, mut out) = a_live_on_link_1();
        subs.remove("a", 0, &mut out);
        assert_eq!(out, vec![Action::Send(1, Command::Unsubscribe, "a".into())]);
        out.clear();
        assert!(!subs.is_live("a"));
        subs.add("a".into(), 0, &mut out);
        subs.subscribe_pending(|_| Some(1), &mut out);
        assert!(out.is_empty(), "the unsubscribe is still on its way");
        subs.confirmed(1, Confirmation::Unsubscribed, "a", &mut out);
        subs.subscribe_pending(|_| Some(1), &mut out);
        assert_eq!(out, vec![Action::Send(1, Command::Subscribe, "a".into())]);
        out.clear();
        subs.confirmed(1, Confirmation::Subscribed, "a", &mut out);
        assert!(subs.is_live("a"));
        subs.remove("a", 0, &mut out);
        out.clear();
        subs.confirmed(1, Confirmation::Unsubscribed, "a", &mut out);
        assert!(subs.is_empty());
    }

    #[test]
    fn an_unasked_unsubscribe_is_a_moved_slot_and_makes_the_workspace_pending() {
        let (mut subs, mut out) = a_live_on_link_1();
        subs.confirmed(1, Confirmation::Unsubscribed, "a", &mut out);
        assert_eq!(out, vec![Action::Ended(1, "a".into())]);
        assert!(!subs.is_live("a"));
        assert_eq!(subs.pending(), 1);
    }

    #[test]
    fn a_lost_connection_makes_its_wanted_workspaces_pending_and_ignores_its_late_replies() {
        let mut subs = Subscriptions::default();
        let mut out = Vec::new();
        subs.add("a".into(), 0, &mut out);
        subs.add("b".into(), 0, &mut out);
        subs.subscribe_pending(|w| Some(if w == "a" { 1 } else { 2 }), &mut out);
        out.clear();
        subs.lost(1, &mut out);
        assert_eq!(subs.pending(), 1);
        subs.confirmed(1, Confirmation::Subscribed, "a", &mut out);
        assert!(out.is_empty() && !subs.is_live("a"));
        subs.confirmed(2, Confirmation::Subscribed, "b", &mut out);
        assert!(subs.is_live("b"));
    }

    #[test]
    fn a_refused_subscribe_answers_its_own_command_and_nothing_else() {
        // Found by the fuzzer: a MOVED for a subscribe, with the workspace given up meanwhile,
        // used to forget every command in flight for it, so the answer to a later unsubscribe
        // was read as the answer to the next subscribe.
        let mut subs = Subscriptions::default();
        let mut out = Vec::new();
        subs.add("a".into(), 0, &mut out);
        subs.subscribe_pending(|_| Some(1), &mut out);
        out.clear();
        subs.remove("a", 0, &mut out);
        assert!(
            out.is_empty(),
            "nothing is sent while the subscribe is unanswered"
        );
        assert_eq!(subs.refused(1, &mut out).as_deref(), Some("a"));
        assert!(out.is_empty(), "refused: there is nothing to unsubscribe");
        assert!(subs.is_empty());
        assert_eq!(subs.refused(1, &mut out), None, "no command is waiting");
    }

    #[test]
    fn an_unasked_end_racing_our_own_unsubscribe_is_counted_once() {
        let (mut subs, mut out) = a_live_on_link_1();
        subs.remove("a", 0, &mut out);
        assert_eq!(out, vec![Action::Send(1, Command::Unsubscribe, "a".into())]);
        out.clear();
        subs.add("a".into(), 0, &mut out);
        // Redis ends it (the slot moved) before it runs our unsubscribe: two `sunsubscribe`s.
        subs.confirmed(1, Confirmation::Unsubscribed, "a", &mut out);
        subs.confirmed(1, Confirmation::Unsubscribed, "a", &mut out);
        assert!(!subs.is_live("a"));
        subs.subscribe_pending(|_| Some(2), &mut out);
        assert_eq!(out, vec![Action::Send(2, Command::Subscribe, "a".into())]);
        out.clear();
        subs.confirmed(2, Confirmation::Subscribed, "a", &mut out);
        assert_eq!(out, vec![Action::Live("a".into(), shards(&[0]))]);
    }

    #[test]
    fn the_model_run_catches_nothing_on_known_sequences() {
        exercise(&[0, 7, 3, 4, 2, 7, 3, 4]);
        exercise(&[0, 7, 6, 3, 4, 7, 3, 4, 5, 7]);
        exercise(&[0, 0x10, 7, 5, 7, 3, 3, 4, 4, 2, 0x12]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_sequence_of_interest_confirmations_losses_and_moves_settles_right(
            ops in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            exercise(&ops);
        }
    }
}
