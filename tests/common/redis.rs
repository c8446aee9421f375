//! Throw-away Redis for the cluster tests: one `redis-server` on a free loopback port, or a Redis
//! Cluster of several, no persistence, killed on drop. Without `redis-server` on the PATH the tests that need one fail under
//! `CI=true` and elsewhere say so loudly and do not run (`.ci/run` installs it).

use causeloop_stream::config::{BusConfig, RedisConfig, RedisNode};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `--requirepass`, when set.
    pub password: Option<String>,
    /// Where it keeps an append-only file written on every write, when it persists.
    persist: Option<std::path::PathBuf>,
}

/// A port nobody listens on right now, below the kernel's ephemeral range (32768 and up), with
/// its Redis Cluster bus port (port + 10000) below it too. Tests kill Redis and start it again
/// on the same port; a port from the ephemeral range could meanwhile become the local port of
/// any outgoing connection on the machine, and the restart would fail.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 32_768 - 10_000 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// Whether `redis-server` is on the PATH; if not, `test` fails under CI and says loudly that it
/// is skipped elsewhere ([`super::deps::missing`]).
fn redis_available(test: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        super::deps::missing(
            test,
            "redis-server is not on the PATH",
            "install it (apt-get install redis-server) to run the cluster tests",
        );
    }
    found
}

/// Whether `redis-server` is 7.0 or later (sharded pub/sub); if not, as [`redis_available`].
fn redis_7_available(test: &str) -> bool {
    if !redis_available(test) {
        return false;
    }
    let out = Command::new("redis-server")
        .arg("--version")
        .output()
        .expect("redis-server runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // "Redis server v=7.0.15 sha=..."
    let major: u32 = text
        .split("v=")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 7 {
        super::deps::missing(
            test,
            &format!(
                "redis-server is older than 7.0 ({}), which sharded pub/sub needs",
                text.trim()
            ),
            "install Redis 7.0 or later",
        );
    }
    major >= 7
}

impl Redis {
    /// Starts one, or explains loudly why it cannot and returns `None`.
    pub fn start(test: &str) -> Option<Redis> {
        Self::start_with_password(test, None)
    }

    /// Like [`Redis::start`], requiring `password` from clients.
    pub fn start_with_password(test: &str, password: Option<&str>) -> Option<Redis> {
        if !redis_available(test) {
            return None;
        }
        let mut r = Redis {
            child: None,
            port: free_port(),
            password: password.map(str::to_string),
            persist: None,
        };
        r.restart();
        Some(r)
    }

    /// Like [`Redis::start`], persisting every write (`appendfsync always`), so that a kill
    /// and a restart lose nothing it acknowledged.
    pub fn start_persistent(test: &str) -> Option<Redis> {
        if !redis_available(test) {
            return None;
        }
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("causeloop-redis-aof-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            child: None,
            port,
            password: None,
            persist: Some(dir),
        };
        r.restart();
        Some(r)
    }

    /// (Re)starts the server on the same port.
    pub fn restart(&mut self) {
        self.launch(&[]);
    }

    /// Starts `redis-server` on this port with `extra` arguments and waits for its PONG.
    fn launch(&mut self, extra: &[&str]) {
        let mut cmd = Command::new("redis-server");
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .args(extra)
            .args(self.persist.iter().flat_map(|d| {
                [
                    "--appendonly".to_string(),
                    "yes".to_string(),
                    "--appendfsync".to_string(),
                    "always".to_string(),
                    "--dir".to_string(),
                    d.display().to_string(),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP` freezes it as a hung host would: its sockets stay open and
    /// silent; `CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills the server (as a crash would: no shutdown handshake with clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `redis-cli` against it; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if let Some(pw) = &self.password {
            cmd.env("REDISCLI_AUTH", pw);
        }
        let out = cmd
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `--bus` configuration pointing at it.
    pub fn bus(&self) -> BusConfig {
        BusConfig::Redis(RedisConfig::single("127.0.0.1", self.port))
    }

    /// `PUBSUB NUMSUB` of a workspace's channel: how many nodes subscribe to it.
    pub fn subscribers(&self, ws: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", &format!("causeloop:v1:ws:{ws}")]);
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.persist {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A throw-away Redis Cluster of `masters` masters (no replicas) on free loopback ports, with
/// the slots split evenly. Killed, and its directory removed, on drop.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    dir: std::path::PathBuf,
    /// `--requirepass` on every master, when set.
    password: Option<String>,
}

impl RedisCluster {
    /// Starts one and waits until every master agrees the cluster is `ok`, or explains loudly
    /// why it cannot and returns `None`.
    pub fn start(test: &str, masters: usize) -> Option<RedisCluster> {
        Self::start_with_password(test, masters, None)
    }

    /// Like [`RedisCluster::start`], every master requiring `password` from clients.
    pub fn start_with_password(
        test: &str,
        masters: usize,
        password: Option<&str>,
    ) -> Option<RedisCluster> {
        if !redis_7_available(test) {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "causeloop-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = RedisCluster {
            nodes: Vec::new(),
            dir,
            password: password.map(str::to_string),
        };
        for _ in 0..masters {
            let port = free_port();
            let mut r = Redis {
                child: None,
                port,
                password: c.password.clone(),
                persist: None,
            };
            c.spawn(&mut r);
            c.nodes.push(r);
        }
        // Slots split evenly, each master with its own config epoch, then everyone meets.
        let per = 16384 / masters;
        for (i, r) in c.nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == masters {
                16383
            } else {
                first + per - 1
            };
            let out = r.cli(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &first.to_string(),
                &last.to_string(),
            ]);
            assert_eq!(out.trim(), "OK", "ADDSLOTSRANGE: {out}");
            r.cli(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()]);
        }
        for r in &c.nodes[1..] {
            let out = c.nodes[0].cli(&["CLUSTER", "MEET", "127.0.0.1", &r.port.to_string()]);
            assert_eq!(out.trim(), "OK", "CLUSTER MEET: {out}");
        }
        c.wait_ok();
        Some(c)
    }

    fn spawn(&self, r: &mut Redis) {
        let conf = self.dir.join(format!("nodes-{}.conf", r.port));
        // Every write persisted: a master killed and started again has what it acknowledged.
        let data = self.dir.join(format!("data-{}", r.port));
        std::fs::create_dir_all(&data).unwrap();
        r.persist = Some(data);
        r.launch(&[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            conf.to_str().unwrap(),
            "--cluster-node-timeout",
            "2000",
            // One master down (there are no replicas) must not stop the others.
            "--cluster-require-full-coverage",
            "no",
        ]);
    }

    /// Waits until every running master says `cluster_state:ok` and knows every master.
    pub fn wait_ok(&self) {
        let start = Instant::now();
        loop {
            let ok = self.nodes.iter().filter(|r| r.child.is_some()).all(|r| {
                r.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && r.cli(&["CLUSTER", "NODES"])
                        .lines()
                        .filter(|l| l.contains("master") && !l.contains("fail"))
                        .count()
                        == self.nodes.len()
            });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the Redis Cluster did not come up: {}",
                self.nodes[0].cli(&["CLUSTER", "NODES"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `--bus` configuration: every master as a seed.
    pub fn bus(&self) -> BusConfig {
        let mut cfg = RedisConfig::single("127.0.0.1", self.nodes[0].port);
        cfg.redis_cluster = true;
        cfg.password = self
            .password
            .as_ref()
            .map(|p| causeloop_stream::config::Secret::from(p.as_bytes().to_vec()));
        cfg.nodes = self
            .nodes
            .iter()
            .map(|r| RedisNode {
                host: "127.0.0.1".into(),
                port: r.port,
            })
            .collect();
        BusConfig::Redis(cfg)
    }

    /// The hash slot of a key, as Redis computes it.
    pub fn slot(&self, key: &str) -> u16 {
        self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap()
    }

    /// One workspace name per master, each owned by that master (its channel
    /// `causeloop:v1:ws:<name>` hashes to one of the master's slots).
    pub fn one_workspace_per_master(&self) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; self.nodes.len()];
        for i in 0.. {
            let ws = format!("ws_{i}");
            let owner = self.owner(self.slot(&format!("causeloop:v1:ws:{ws}")));
            found[owner].get_or_insert(ws);
            if found.iter().all(Option::is_some) {
                break;
            }
        }
        found.into_iter().map(Option::unwrap).collect()
    }

    /// Which master (index) owns `slot`, according to master 0.
    pub fn owner(&self, slot: u16) -> usize {
        let out = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            for range in &fields[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) else {
                    continue;
                };
                if (a..=b).contains(&slot) {
                    return self.nodes.iter().position(|r| r.port == port).unwrap();
                }
            }
        }
        panic!("no master owns slot {slot}: {out}")
    }

    /// `PUBSUB SHARDNUMSUB` of `channel` on each master: its sharded subscribers there.
    pub fn shard_subscribers(&self, channel: &str) -> Vec<u64> {
        self.per_master(&["PUBSUB", "SHARDNUMSUB", channel])
    }

    /// `PUBSUB NUMSUB` (classic, cluster-wide broadcast pub/sub) of `channel` on each master.
    pub fn classic_subscribers(&self, channel: &str) -> Vec<u64> {
        self.per_master(&["PUBSUB", "NUMSUB", channel])
    }

    /// The count a `PUBSUB ...NUMSUB` of one channel answers, on each master.
    fn per_master(&self, command: &[&str]) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|r| {
                r.cli(command)
                    .lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Moves an empty `slot` to master `to`, as a resharding does: importing and migrating,
    /// then the new owner announced to every master, the old owner last.
    pub fn move_slot(&self, slot: u16, to: usize) {
        self.move_slot_and(slot, to, || {});
    }

    /// Like [`RedisCluster::move_slot`], running `then` the instant the old owner has let go
    /// of the slot (and ended the subscriptions in it): its last step is sent over a socket
    /// held open for it, so that nothing stands between the two.
    pub fn move_slot_and<T>(&self, slot: u16, to: usize, then: impl FnOnce() -> T) -> T {
        use std::io::{Read, Write};
        let from = self.owner(slot);
        let id = |i: usize| self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_string();
        let (from_id, to_id) = (id(from), id(to));
        let s = slot.to_string();
        self.nodes[to].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        self.nodes[from].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        // Its keys go over first, as a resharding moves them (MIGRATE, a few at a time).
        let to_port = self.nodes[to].port.to_string();
        loop {
            let keys = self.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "10"]);
            let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000"];
            if self.password.is_some() {
                args.extend(["AUTH", self.password.as_deref().unwrap()]);
            }
            args.push("KEYS");
            args.extend(keys);
            let out = self.nodes[from].cli(&args);
            assert!(
                out.trim() == "OK" || out.trim() == "NOKEY",
                "MIGRATE: {out}"
            );
        }
        for (i, r) in self.nodes.iter().enumerate() {
            if i != from {
                let out = r.cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
                assert_eq!(out.trim(), "OK", "SETSLOT NODE: {out}");
            }
        }
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", self.nodes[from].port)).unwrap();
        sock.write_all(format!("CLUSTER SETSLOT {s} NODE {to_id}\r\n").as_bytes())
            .unwrap();
        let mut ok = [0u8; 5];
        sock.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"+OK\r\n");
        then()
    }

    /// Kills master `i` (as a crash would).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts every master again (see [`RedisCluster::restart`]) and waits for the cluster.
    pub fn restart_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.respawn(i);
        }
        self.wait_ok();
    }

    /// Starts master `i` again on its port with its cluster config: it rejoins as it was.
    pub fn restart(&mut self, i: usize) {
        self.respawn(i);
        self.wait_ok();
    }

    fn respawn(&mut self, i: usize) {
        let mut r = Redis {
            child: None,
            port: self.nodes[i].port,
            password: self.password.clone(),
            persist: None,
        };
        self.spawn(&mut r);
        // The old handle must not remove the data directory the new process uses.
        self.nodes[i].persist = None;
        self.nodes[i] = r;
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for r in &mut self.nodes {
            r.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
