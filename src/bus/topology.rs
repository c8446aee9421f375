//! Where a channel lives: one Redis server, or the master of a Redis Cluster that owns the
//! channel's hash slot.
//!
//! A Redis Cluster splits its keyspace into 16,384 slots; a sharded pub/sub channel belongs to
//! slot `CRC16(channel) mod 16384` (of the part inside the first non-empty `{...}`, if any),
//! and `SSUBSCRIBE`/`SPUBLISH` for it must go to the master that owns that slot. The layout
//! comes from `CLUSTER SLOTS`; a `MOVED` answer says a slot has changed hands since.

use super::resp::Reply;
use crate::config::RedisNode;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16384;
const NOBODY: u16 = u16::MAX;

/// The hash slot of `key`, as Redis Cluster computes it.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster slots use.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which server each channel goes to.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The masters (or the one server).
    pub nodes: Vec<RedisNode>,
    /// Per slot, the index of its master in `nodes`, or [`NOBODY`]; empty for one server.
    owner: Vec<u16>,
    /// Slots that are [`NOBODY`]'s (kept, not counted: the bus asks on every turn).
    uncovered: usize,
}

impl Topology {
    /// One Redis server: every channel goes to it.
    pub fn single(node: RedisNode) -> Topology {
        Topology {
            nodes: vec![node],
            owner: Vec::new(),
            uncovered: 0,
        }
    }

    /// A cluster whose layout is not known yet: no channel has a home.
    pub fn unknown() -> Topology {
        Topology {
            nodes: Vec::new(),
            owner: vec![NOBODY; SLOTS],
            uncovered: SLOTS,
        }
    }

    /// Whether this is a cluster's layout (as opposed to one server).
    pub fn is_cluster(&self) -> bool {
        !self.owner.is_empty()
    }

    /// The index in `nodes` of the server `channel` goes to, if any serves it.
    pub fn node_for(&self, channel: &[u8]) -> Option<usize> {
        self.node_for_slot(slot(channel))
    }

    /// The index in `nodes` of the server that serves hash `slot`, if any (for one server,
    /// that server, whatever the slot).
    pub fn node_for_slot(&self, slot: u16) -> Option<usize> {
        if !self.is_cluster() {
            return (!self.nodes.is_empty()).then_some(0);
        }
        match self.owner.get(usize::from(slot)).copied() {
            None | Some(NOBODY) => None,
            Some(i) => Some(usize::from(i)),
        }
    }

    /// Slots no master serves (a cluster that is partly down, or a layout not yet known).
    pub fn uncovered(&self) -> usize {
        self.uncovered
    }

    /// Gives `slot` to `nodes[i]`.
    fn assign(&mut self, slot: usize, i: usize) {
        if self.owner[slot] == NOBODY {
            self.uncovered -= 1;
        }
        self.owner[slot] = i as u16;
    }

    /// The slots whose master differs in `newer` (none when this layout was not known yet).
    pub fn changed_slots(&self, newer: &Topology) -> Vec<u16> {
        if !self.is_cluster() || !newer.is_cluster() || self.nodes.is_empty() {
            return Vec::new();
        }
        (0..SLOTS)
            .filter(|&s| self.master_of(s) != newer.master_of(s))
            .map(|s| s as u16)
            .collect()
    }

    fn master_of(&self, slot: usize) -> Option<&RedisNode> {
        match self.owner[slot] {
            NOBODY => None,
            i => self.nodes.get(usize::from(i)),
        }
    }

    /// Applies a `MOVED` redirect: `slot` now belongs to `node`.
    pub fn moved(&mut self, slot: u16, node: RedisNode) {
        if !self.is_cluster() || usize::from(slot) >= SLOTS {
            return;
        }
        let i = match self.nodes.iter().position(|n| *n == node) {
            Some(i) => i,
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        self.assign(usize::from(slot), i);
    }

    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    /// A master announced with an empty host is the server that was asked (`asked`).
    pub fn from_cluster_slots(reply: &Reply, asked: &RedisNode) -> Result<Topology, String> {
        let Reply::Array(Some(ranges)) = reply else {
            return Err(format!("CLUSTER SLOTS answered {}", describe(reply)));
        };
        let mut t = Topology::unknown();
        for range in ranges {
            let Reply::Array(Some(items)) = range else {
                return Err("CLUSTER SLOTS: a slot range is not an array".into());
            };
            let (Some(Reply::Integer(start)), Some(Reply::Integer(end)), Some(master)) =
                (items.first(), items.get(1), items.get(2))
            else {
                return Err("CLUSTER SLOTS: a slot range lacks its bounds or master".into());
            };
            let (start, end) = (*start, *end);
            if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
                return Err(format!("CLUSTER SLOTS: bad slot range {start}-{end}"));
            }
            let Reply::Array(Some(m)) = master else {
                return Err("CLUSTER SLOTS: a master is not an array".into());
            };
            let (Some(host), Some(Reply::Integer(port))) =
                (m.first().and_then(Reply::as_bytes), m.get(1))
            else {
                return Err("CLUSTER SLOTS: a master lacks its host or port".into());
            };
            let port =
                u16::try_from(*port).map_err(|_| format!("CLUSTER SLOTS: bad port {port}"))?;
            let host = match std::str::from_utf8(host) {
                Ok("") => asked.host.clone(),
                // Redis announces `?` for a master whose endpoint it does not know yet.
                Ok("?") => continue,
                Ok(h) => h.to_string(),
                Err(_) => return Err("CLUSTER SLOTS: a host is not UTF-8".into()),
            };
            let node = RedisNode { host, port };
            let i = match t.nodes.iter().position(|n| *n == node) {
                Some(i) => i,
                None => {
                    t.nodes.push(node);
                    t.nodes.len() - 1
                }
            };
            for s in start..=end {
                t.assign(s as usize, i);
            }
        }
        Ok(t)
    }
}

/// A redirect in an error reply: `MOVED <slot> <host>:<port>` (or `ASK`, which sharded pub/sub
/// does not use but is read the same way).
pub fn redirect(error: &[u8]) -> Option<(u16, RedisNode)> {
    let text = std::str::from_utf8(error).ok()?;
    let mut words = text.split_ascii_whitespace();
    if !matches!(words.next(), Some("MOVED" | "ASK")) {
        return None;
    }
    let slot: u16 = words.next()?.parse().ok()?;
    if usize::from(slot) >= SLOTS {
        return None;
    }
    let (host, port) = words.next()?.rsplit_once(':')?;
    Some((
        slot,
        RedisNode {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.parse().ok()?,
        },
    ))
}

fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Error(e) => String::from_utf8_lossy(e).into_owned(),
        other => format!("{other:?}").chars().take(120).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::resp;

    fn node(host: &str, port: u16) -> RedisNode {
        RedisNode {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0 and the cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"causeloop:v1:ws:ws_a"), 7802);
        // Hash tags: the first non-empty `{...}` decides.
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn cluster_slots_reply_and_routing() {
        let wire = b"*3\r\n\
            *3\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7101\r\n$2\r\nid\r\n\
            *4\r\n:5461\r\n:10922\r\n*2\r\n$0\r\n\r\n:7102\r\n*2\r\n$9\r\n127.0.0.1\r\n:7202\r\n\
            *3\r\n:10923\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7103\r\n";
        let (reply, used) = resp::parse(wire, 1024).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let t = Topology::from_cluster_slots(&reply, &node("10.1.1.1", 7102)).unwrap();
        assert_eq!(t.uncovered(), 0);
        assert_eq!(
            t.nodes,
            [
                node("127.0.0.1", 7101),
                node("10.1.1.1", 7102),
                node("127.0.0.1", 7103)
            ]
        );
        assert_eq!(t.node_for(b"causeloop:v1:ws:ws_a"), Some(1)); // slot 7802
        assert_eq!(t.node_for(b"foo"), Some(2)); // slot 12182
        let mut t = t;
        t.moved(7802, node("127.0.0.1", 7104));
        assert_eq!(
            t.nodes[t.node_for(b"causeloop:v1:ws:ws_a").unwrap()].port,
            7104
        );
        assert_eq!(t.node_for(b"foo"), Some(2));
    }

    #[test]
    fn bad_cluster_slots_replies_are_errors() {
        let asked = node("h", 1);
        let err = Topology::from_cluster_slots(
            &Reply::Error(b"ERR This instance has cluster support disabled".to_vec()),
            &asked,
        )
        .unwrap_err();
        assert!(err.contains("cluster support disabled"), "{err}");
        for wire in [
            &b"*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n"[..],
            b"*1\r\n*3\r\n:9\r\n:3\r\n*2\r\n$1\r\nh\r\n:1\r\n",
            b"*1\r\n*2\r\n:0\r\n:3\r\n",
            b"*1\r\n*3\r\n:0\r\n:3\r\n*2\r\n$1\r\nh\r\n:70000\r\n",
            b"*1\r\n:1\r\n",
        ] {
            let (reply, _) = resp::parse(wire, 1024).unwrap().unwrap();
            assert!(Topology::from_cluster_slots(&reply, &asked).is_err());
        }
        // A partial layout leaves the rest uncovered rather than guessing.
        let (reply, _) = resp::parse(b"*1\r\n*3\r\n:0\r\n:99\r\n*2\r\n$1\r\nh\r\n:1\r\n", 1024)
            .unwrap()
            .unwrap();
        let t = Topology::from_cluster_slots(&reply, &asked).unwrap();
        assert_eq!(t.uncovered(), SLOTS - 100);
        assert_eq!(t.node_for(b"foo"), None);
    }

    #[test]
    fn changed_slots_compare_masters_not_indices() {
        let mut a = Topology::unknown();
        a.moved(1, node("h", 1));
        a.moved(2, node("h", 2));
        // The same owners, listed in another order: nothing changed.
        let mut b = Topology::unknown();
        b.moved(2, node("h", 2));
        b.moved(1, node("h", 1));
        assert_eq!(a.changed_slots(&b), Vec::<u16>::new());
        b.moved(1, node("h", 2));
        b.moved(3, node("h", 1));
        assert_eq!(a.changed_slots(&b), [1, 3]);
        // Learning the layout for the first time is not a move.
        assert!(Topology::unknown().changed_slots(&b).is_empty());
    }

    #[test]
    fn redirects() {
        assert_eq!(
            redirect(b"MOVED 7802 127.0.0.1:7101"),
            Some((7802, node("127.0.0.1", 7101)))
        );
        assert_eq!(redirect(b"ASK 1 [::1]:7000"), Some((1, node("::1", 7000))));
        assert_eq!(redirect(b"MOVED 16384 h:1"), None);
        assert_eq!(redirect(b"MOVED 1 h"), None);
        assert_eq!(redirect(b"ERR unknown command"), None);
    }

    #[test]
    fn one_server_takes_everything() {
        let t = Topology::single(node("h", 1));
        assert!(!t.is_cluster());
        assert_eq!(t.node_for(b"anything"), Some(0));
        assert_eq!(t.uncovered(), 0);
        assert_eq!(Topology::unknown().node_for(b"x"), None);
    }
}
