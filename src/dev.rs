//! `causeloop-stream --dev`: a ready local setup for a first run.
//!
//! Random HS256 secret and publish key (unless configured), the page on `GET /` (see
//! `causeloop_stream::dev_site`) whose address the banner prints first, a ready `ws://` URL
//! holding a fresh token, a ready `curl` publish command, and a demo publisher that sends a
//! sample of every event type of the API document to the dev workspace. Loud on purpose.

use causeloop_stream::auth::jwt;
use causeloop_stream::bus::body::BodyLimits;
use causeloop_stream::bus::Publisher;
use causeloop_stream::clock;
use causeloop_stream::config::{Config, Secret};
use causeloop_stream::dev_site::DevSite;
use causeloop_stream::server::Server;
use ring::rand::{SecureRandom, SystemRandom};
use std::io::Write;
use std::time::Duration;

/// Workspace the dev token and the demo publisher use.
pub const DEV_WORKSPACE: &str = "ws_dev";
/// User the dev token names.
pub const DEV_USER: &str = "usr_dev";
/// Pause between demo events.
const DEMO_EVERY: Duration = Duration::from_secs(2);

/// What the banner and the page's publisher need after the server has started.
pub struct Dev {
    secret: Secret,
    publish_key: Secret,
    /// The dev token (24 h), in the banner's URL and in the page.
    token: String,
    /// The page's publishes, for the thread that publishes them.
    page_queue: Option<crossbeam_channel::Receiver<Vec<u8>>>,
    limits: BodyLimits,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut b)
        .expect("system random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fills in random secrets where none are configured.
pub fn prepare(config: &mut Config) -> Dev {
    if config.jwt.hs256_secrets.is_empty() && config.jwt.hs256_secret_file.is_none() {
        config
            .jwt
            .hs256_secrets
            .push(Secret::from(random_hex(32).into_bytes()));
    }
    if config.publish_key.is_none() {
        config.publish_key = Some(Secret::from(random_hex(24).into_bytes()));
    }
    let secret = match config.jwt.hs256_secrets.first() {
        Some(s) => s.clone(),
        None => config
            .jwt
            .hs256_secret_file
            .as_deref()
            .and_then(|p| causeloop_stream::cli::read_secret_file(p).ok())
            .unwrap_or_else(|| Secret::from(Vec::new())),
    };
    let now = clock::now_secs();
    let claims = jwt::claims_json(
        &config.jwt.workspace_claim,
        DEV_WORKSPACE,
        DEV_USER,
        now,
        now + 24 * 3600,
    );
    let token = jwt::sign_hs256(secret.expose(), &claims);
    let limits = BodyLimits::of(config);
    let (site, page_queue) = DevSite::new(DEV_WORKSPACE, DEV_USER, &token, limits);
    config.dev_site = Some(std::sync::Arc::new(site));
    Dev {
        secret,
        publish_key: config.publish_key.clone().expect("set above"),
        token,
        page_queue: Some(page_queue),
        limits,
    }
}

fn loopback_if_unspecified(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}

impl Dev {
    /// Prints the banner on stdout.
    pub fn announce(&self, server: &Server) {
        let token = &self.token;
        let public = loopback_if_unspecified(server.public_addr());
        let internal = loopback_if_unspecified(server.internal_addr());
        let key = String::from_utf8_lossy(self.publish_key.expose());
        let secret = String::from_utf8_lossy(self.secret.expose());
        let scheme = if server.config().tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        let page = if server.config().tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "
Open {page}://{public}/ in a browser: the stream live, and a form to publish.

=== causeloop-stream DEVELOPMENT MODE: random secrets, demo publisher. Never use in production. ===

Stream URL (token valid 24h, workspace {DEV_WORKSPACE}, user {DEV_USER}):
  {scheme}://{public}/v1/stream?token={token}&workspace={DEV_WORKSPACE}

Watch it from a terminal (Node 20+):
  node --experimental-websocket -e 'new WebSocket(process.argv[1]).onmessage = (m) => console.log(m.data)' '{scheme}://{public}/v1/stream?token={token}&workspace={DEV_WORKSPACE}'

Publish an event:
  curl -sS -X POST http://{internal}/v1/publish -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"workspace_id\":\"{DEV_WORKSPACE}\",\"type\":\"issue.created\",\"payload\":{{\"id\":\"iss_1\",\"title\":\"Hello from curl\"}}}}'

Mint more tokens:
  {ENV}={secret} causeloop-stream token --workspace {DEV_WORKSPACE} --user usr_2

A demo publisher sends a sample of every event type to {DEV_WORKSPACE} every {every}s.
",
            ENV = causeloop_stream::cli::ENV_HS256_SECRET,
            every = DEMO_EVERY.as_secs(),
        );
        let _ = out.flush();
    }
}

/// The sample events of the API document, in its order.
fn samples(n: u64) -> Vec<(&'static str, serde_json::Value)> {
    let now = String::from_utf8_lossy(&clock::format_ts(clock::now_ms())).into_owned();
    use serde_json::json;
    vec![
        (
            "issue.created",
            json!({"id": format!("iss_{n:04}"), "title": "Payment gateway timeout on checkout", "status": "new", "severity": "high", "risk_score": 74, "source": "pagerduty", "created_at": now}),
        ),
        (
            "issue.status.changed",
            json!({"id": format!("iss_{n:04}"), "previous_status": "new", "status": "analyzing", "changed_at": now}),
        ),
        (
            "pattern.detected",
            json!({"id": format!("pat_{n:04}"), "name": "Payment gateway timeout under load", "risk_score": 82, "status": "emerging", "issue_count": 7, "detected_at": now}),
        ),
        (
            "prediction.alert.fired",
            json!({"id": format!("alr_{n:04}"), "rule": "checkout latency p99 > 2s", "fired_at": now}),
        ),
        (
            "recommendation.status.changed",
            json!({"id": format!("rec_{n:04}"), "previous_status": "proposed", "status": "accepted", "changed_at": now}),
        ),
        (
            "notification.created",
            json!({"id": format!("ntf_{n:04}"), "title": "You were assigned an issue", "created_at": now}),
        ),
        (
            "job.updated",
            json!({"job_id": format!("rpt_job_{n:04}"), "status": "running", "progress": 0.65, "result_url": null, "error": null, "created_at": now, "finished_at": null}),
        ),
    ]
}

/// Starts the demo publisher thread; it stops when the server drains.
impl Dev {
    /// Starts the thread that publishes what the page's form sends.
    pub fn spawn_page_publisher(&mut self, publisher: Publisher) {
        if let Some(queue) = self.page_queue.take() {
            let limits = self.limits;
            std::thread::spawn(move || DevSite::publish_queued(queue, publisher, limits));
        }
    }
}

pub fn spawn_demo_publisher(publisher: Publisher) {
    std::thread::spawn(move || {
        let mut n = 0u64;
        loop {
            for (kind, payload) in samples(n) {
                std::thread::sleep(DEMO_EVERY);
                let result = if kind == "notification.created" {
                    publisher.publish_user(DEV_WORKSPACE, DEV_USER, kind, &payload)
                } else {
                    publisher.publish(DEV_WORKSPACE, kind, &payload)
                };
                if result.is_err() {
                    return;
                }
            }
            n += 1;
        }
    });
}
