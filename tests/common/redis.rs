//! A throw-away Redis server for the cluster tests: `redis-server` on a free loopback port, no
//! persistence, killed on drop. Without `redis-server` on the PATH the tests that need one say so
//! loudly and do not run (`.ci/run` installs it, so CI always runs them).

use causeloop_stream::config::{BusConfig, RedisConfig};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `--requirepass`, when set.
    pub password: Option<String>,
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// Starts one, or explains loudly why it cannot and returns `None`.
    pub fn start(test: &str) -> Option<Redis> {
        Self::start_with_password(test, None)
    }

    /// Like [`Redis::start`], requiring `password` from clients.
    pub fn start_with_password(test: &str, password: Option<&str>) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!(
                "\n!!!!!!!! SKIPPED {test}: redis-server is not on the PATH !!!!!!!!\n\
                 !!!!!!!! install it (apt-get install redis-server) to run the cluster tests\n"
            );
            return None;
        }
        let mut r = Redis {
            child: None,
            port: free_port(),
            password: password.map(str::to_string),
        };
        r.restart();
        Some(r)
    }

    /// (Re)starts the server on the same port.
    pub fn restart(&mut self) {
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
        BusConfig::Redis(RedisConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            db: 0,
            password: None,
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
