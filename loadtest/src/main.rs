//! `causeloop-loadtest`: the load tester for servers that implement the causeloop-stream contract.
//!
//! It speaks only the public contract (the stream URL, `POST /v1/publish`), so it measures any
//! implementation. The orchestrator (this process) spawns `--processes` worker processes (each a
//! single-threaded mio loop holding its share of the connections; several processes get past the
//! per-process file limit), runs the publisher, samples the server's `/proc` entry, aggregates
//! the workers' reports and writes the table, `--json` and `--report`.
//!
//! Secrets come from the environment only: `CAUSELOOP_JWT_HS256_SECRET` to mint tokens,
//! `CAUSELOOP_PUBLISH_KEY` to publish. Workers receive them on stdin, never in argv.
#![forbid(unsafe_code)]

mod compare;
mod engine;
mod floor;
mod procfs;
mod publisher;
mod report;
mod seconds;
mod spec;
mod tls;
mod token;
mod wire;

use clap::{Args, Parser, Subcommand};
use report::{
    ConnectFigures, FanoutFigures, Percentiles, Point, Results, SelfFigures, ServerFigures,
};
use spec::{Scenario, WorkerReport, WorkerSpec};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "causeloop-loadtest",
    version,
    about = "Load tester for causeloop-stream and any server of its contract"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ramp N connections at a target rate and hold them.
    Connect(Common),
    /// Subscribers over W workspaces receive events published at R events/s per workspace.
    Fanout(FanoutArgs),
    /// Drop every connection at once; reconnect with the seed client's backoff and jitter.
    Storm(Common),
    /// Fan-out where a fraction of subscribers stop reading: they must be closed 1008, the others unaffected.
    Slow(SlowArgs),
    /// Run the bare-send floor server (for the CPU floor; see docs/loadtest.md).
    FloorServer(FloorArgs),
    /// Put runs side by side (their --json files, one scenario): every figure with its ratio
    /// to the first run's, latency curves overlaid.
    Compare(CompareArgs),
    /// Internal: a worker process (reads its spec on stdin).
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Clone)]
struct Common {
    /// Public stream address of a node (`ws://host:port`, or `wss://host:port` for TLS); repeat
    /// for several nodes (all with the same scheme).
    #[arg(long = "url", default_value = "ws://127.0.0.1:4000")]
    urls: Vec<String>,
    /// Internal (publish) address.
    #[arg(long, default_value = "http://127.0.0.1:4001")]
    internal: String,
    /// Connections to open.
    #[arg(long, default_value_t = 2000)]
    connections: u64,
    /// Workspaces the connections spread over.
    #[arg(long, default_value_t = 20)]
    workspaces: u32,
    /// Zipf exponent of the spread over workspaces (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// Connections opened per second in all (0: as fast as --max-inflight allows).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Handshakes in flight at once, per process.
    #[arg(long, default_value_t = 1000)]
    max_inflight: u64,
    /// Worker processes (each holds at most ~19,000 sockets under a 20,000 file limit).
    #[arg(long, default_value_t = 1)]
    processes: u32,
    /// Source addresses, e.g. `127.0.0.2-127.0.0.9` or `127.0.0.2,127.0.0.3` (~28k ports each).
    #[arg(long)]
    source_ips: Option<String>,
    /// How long to measure (hold, publish, or wait for a storm to settle).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// The server's process id: sample its CPU and RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write every figure as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write a self-contained HTML report with charts.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// The server's heartbeat interval (for heartbeat lateness).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Name of the workspace claim in minted tokens.
    #[arg(long, default_value = "workspace_id")]
    jwt_workspace_claim: String,
    /// Workspace id prefix.
    #[arg(long, default_value = "lt_ws_")]
    workspace_prefix: String,
    /// `wss://`: a PEM file of the certificate authorities to trust.
    #[arg(long)]
    ca_file: Option<String>,
    /// `wss://`: accept any certificate (the handshake's signatures are still checked). For
    /// measuring a server with a throwaway certificate; never to trust one.
    #[arg(long)]
    insecure: bool,
    /// Give up waiting for connections after this long.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    connect_timeout: Duration,
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Events per second per workspace (0: no built-in publisher; publish from elsewhere).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Publish interval: the events due in one tick travel in one request, so a longer tick
    /// makes bursts whose frames share writes.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    tick: Duration,
    /// Padding bytes in each payload.
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// Largest publish body (the server's --max-publish-bytes).
    #[arg(long, default_value_t = 1 << 20)]
    max_publish_bytes: usize,
    /// Churn: connections per second (in all) closed with a close handshake and reopened at
    /// once, from when every connection is open; a reopened subscriber's sequence starts afresh
    /// (see --continuity). Connections the server closes (a slow reader's 1008) reconnect too.
    /// For soak runs.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// A reconnected subscriber (it always reconnects with the same token, as the seed's client
    /// does) carries its sequence across the reconnect: events published while it was away
    /// count as lost unless the server resumes it (or tells it with `stream.gap`).
    #[arg(long)]
    continuity: bool,
    /// Offer `permessage-deflate` (as browsers do) and inflate the compressed frames the server
    /// sends, so that compression's cost and savings can be measured.
    #[arg(long)]
    compression: bool,
}

#[derive(Args, Clone)]
struct SlowArgs {
    #[command(flatten)]
    fanout: FanoutArgs,
    /// Fraction of subscribers that stop reading.
    #[arg(long, default_value_t = 0.1)]
    slow_fraction: f64,
}

#[derive(Args, Clone)]
struct CompareArgs {
    /// Runs' JSON files (written with --json); the first is the baseline.
    #[arg(required = true, num_args = 2..)]
    runs: Vec<std::path::PathBuf>,
    /// Write a self-contained HTML comparison.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

#[derive(Args, Clone)]
struct FloorArgs {
    /// Public listener.
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// Internal listener.
    #[arg(long, default_value = "127.0.0.1:4001")]
    internal_listen: SocketAddr,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split]
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    match &s[split..] {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: use ms, s or m")),
    }
}

fn parse_ips(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                a.trim().parse().map_err(|_| format!("bad address {a}"))?,
                b.trim().parse().map_err(|_| format!("bad address {b}"))?,
            );
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1024 {
                return Err(format!("bad range {part}"));
            }
            out.extend((a..=b).map(|ip| std::net::Ipv4Addr::from(ip).to_string()));
        } else {
            let ip: IpAddr = part
                .trim()
                .parse()
                .map_err(|_| format!("bad address {part}"))?;
            out.push(ip.to_string());
        }
    }
    Ok(out)
}

/// TLS for the URLs: all `wss://` (TLS, with the first URL's host as the certificate's name) or
/// all `ws://`.
fn tls_of(c: &Common) -> Result<Option<tls::TlsSpec>, String> {
    let secure = c.urls.iter().filter(|u| u.starts_with("wss://")).count();
    if secure == 0 {
        return Ok(None);
    }
    if secure != c.urls.len() {
        return Err("mix of ws:// and wss:// URLs: use one scheme".into());
    }
    if c.ca_file.is_none() && !c.insecure {
        return Err("wss:// needs --ca-file FILE (the authority that signed the server's certificate) or --insecure".into());
    }
    let rest = &c.urls[0]["wss://".len()..];
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let spec = tls::TlsSpec {
        server_name: host.to_string(),
        ca_file: c.ca_file.clone(),
        insecure: c.insecure,
    };
    // Refused here, once, rather than in every worker.
    tls::client_config(&spec)?;
    Ok(Some(spec))
}

fn host_port(url: &str) -> Result<String, String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hp = rest.split('/').next().unwrap_or("");
    use std::net::ToSocketAddrs;
    hp.to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .map(|a| a.to_string())
        .ok_or_else(|| format!("{url}: no address"))
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::Worker => worker(),
        Cmd::FloorServer(a) => match floor::run(a.listen, a.internal_listen) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("floor-server: {e}");
                1
            }
        },
        Cmd::Compare(a) => match compare::load(&a.runs) {
            Ok(runs) => {
                print!("{}", compare::text(&runs));
                match &a.report {
                    Some(path) => match std::fs::write(path, compare::html(&runs)) {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("compare: {}: {e}", path.display());
                            1
                        }
                    },
                    None => 0,
                }
            }
            Err(e) => {
                eprintln!("causeloop-loadtest compare: {e}");
                2
            }
        },
        Cmd::Connect(c) => orchestrate(Scenario::Connect, c, None, 0.0),
        Cmd::Storm(c) => orchestrate(Scenario::Storm, c, None, 0.0),
        Cmd::Fanout(f) => orchestrate(Scenario::Fanout, f.common.clone(), Some(f), 0.0),
        Cmd::Slow(s) => orchestrate(
            Scenario::Slow,
            s.fanout.common.clone(),
            Some(s.fanout),
            s.slow_fraction,
        ),
    };
    std::process::exit(code);
}

/// The worker process: spec on the first stdin line, then commands; reports on stdout.
fn worker() -> i32 {
    let mut first = String::new();
    if std::io::stdin().read_line(&mut first).unwrap_or(0) == 0 {
        return 2;
    }
    let spec: WorkerSpec = match serde_json::from_str(&first) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: bad spec: {e}");
            return 2;
        }
    };
    let (fleet, waker) = match engine::Fleet::new(spec) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("worker: {e}");
            return 2;
        }
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            let cmd = match line.trim() {
                "drop" => engine::Command::Drop,
                _ => engine::Command::Stop,
            };
            if tx.send(cmd).is_err() {
                return;
            }
            let _ = waker.wake();
        }
        // stdin closed: the orchestrator is gone.
        let _ = tx.send(engine::Command::Stop);
        let _ = waker.wake();
    });
    let mut out = std::io::stdout().lock();
    fleet.run(rx, |r| {
        let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        let _ = out.flush();
    });
    0
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    latest: WorkerReport,
    ready: bool,
    final_report: Option<WorkerReport>,
    cpu_prev: (Instant, u64),
    max_share: f64,
}

fn orchestrate(
    scenario: Scenario,
    c: Common,
    fanout: Option<FanoutArgs>,
    slow_fraction: f64,
) -> i32 {
    match run(scenario, c, fanout, slow_fraction) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("causeloop-loadtest: {e}");
            2
        }
    }
}

fn run(
    scenario: Scenario,
    c: Common,
    fanout: Option<FanoutArgs>,
    slow_fraction: f64,
) -> Result<i32, String> {
    let secret = std::env::var("CAUSELOOP_JWT_HS256_SECRET")
        .map_err(|_| "set CAUSELOOP_JWT_HS256_SECRET (the server's HS256 secret) to mint tokens")?;
    let targets = c
        .urls
        .iter()
        .map(|u| host_port(u))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = tls_of(&c)?;
    let sources = match &c.source_ips {
        Some(s) => parse_ips(s)?,
        None => Vec::new(),
    };
    let processes = c.processes.max(1);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let server_pid = c.server_pid.map(|p| p.to_string());
    let sample_server = || server_pid.as_deref().and_then(procfs::sample);
    let server_start = sample_server();
    if c.server_pid.is_some() && server_start.is_none() {
        return Err(format!(
            "cannot read /proc/{}: is --server-pid right?",
            c.server_pid.unwrap_or(0)
        ));
    }
    let started = Instant::now();
    let started_unix_ms = engine::unix_ns() / 1_000_000;
    let self_cpu_start = procfs::cpu_ns("self").unwrap_or(0);

    // Spawn the workers with contiguous shares of the connections.
    let (tx, rx) = mpsc::channel::<(usize, WorkerReport)>();
    let mut workers = Vec::new();
    for w in 0..processes as u64 {
        let first = c.connections * w / processes as u64;
        let end = c.connections * (w + 1) / processes as u64;
        let spec = WorkerSpec {
            scenario,
            targets: targets.clone(),
            first,
            count: end - first,
            total: c.connections,
            workspaces: c.workspaces.max(1),
            skew: c.skew,
            workspace_prefix: c.workspace_prefix.clone(),
            connect_rate: c.connect_rate / processes as f64,
            max_inflight: c.max_inflight,
            secret: secret.clone(),
            claim: c.jwt_workspace_claim.clone(),
            source_ips: sources.clone(),
            slow_fraction,
            heartbeat_interval_ms: c.heartbeat_interval.as_millis() as u64,
            churn_per_s: fanout.as_ref().map_or(0.0, |f| f.churn) / processes as f64,
            continuity: fanout.as_ref().is_some_and(|f| f.continuity),
            compression: fanout.as_ref().is_some_and(|f| f.compression),
            tls: tls.clone(),
            started_unix_ms,
        };
        let mut child = Command::new(&exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning a worker: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("worker stdin")?;
        writeln!(
            stdin,
            "{}",
            serde_json::to_string(&spec).map_err(|e| e.to_string())?
        )
        .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let tx = tx.clone();
        let idx = w as usize;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(r) = serde_json::from_str::<WorkerReport>(&line) {
                    if tx.send((idx, r)).is_err() {
                        return;
                    }
                }
            }
        });
        let pid = child.id();
        workers.push(Worker {
            child,
            stdin,
            latest: WorkerReport::default(),
            ready: false,
            final_report: None,
            cpu_prev: (
                Instant::now(),
                procfs::cpu_ns(&pid.to_string()).unwrap_or(0),
            ),
            max_share: 0.0,
        });
    }
    drop(tx);

    let mut series: Vec<Point> = Vec::new();
    let mut seconds = seconds::Seconds::new(started_unix_ms, workers.len());
    let mut tick = Instant::now() + Duration::from_secs(1);
    let mut interval_hist =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");

    // Pumps worker reports for up to `limit`, printing a progress line each second; stops early
    // when `done` says so.
    let mut pump = |workers: &mut Vec<Worker>,
                    limit: Duration,
                    phase: &str,
                    done: &mut dyn FnMut(&[Worker]) -> bool| {
        let until = Instant::now() + limit;
        loop {
            if done(workers) || Instant::now() >= until {
                return;
            }
            let wait = tick
                .saturating_duration_since(Instant::now())
                .min(until.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok((i, r)) => {
                    match r.kind.as_str() {
                        "ready" => workers[i].ready = true,
                        "final" => {
                            workers[i].final_report = Some(r.clone());
                            continue;
                        }
                        "progress" => {
                            let _ = interval_hist.add(engine::decode_hist(&r.latency_hist));
                            seconds.add(i, r.t_ms, r.events);
                        }
                        _ => {}
                    }
                    workers[i].latest = r;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= tick {
                tick += Duration::from_secs(1);
                let open: u64 = workers.iter().map(|w| w.latest.open).sum();
                let failures: u64 = workers
                    .iter()
                    .map(|w| w.latest.failures.values().sum::<u64>())
                    .sum();
                let p99 = if interval_hist.is_empty() {
                    0
                } else {
                    interval_hist.value_at_quantile(0.99)
                };
                interval_hist.reset();
                for w in workers.iter_mut() {
                    if let Some(cpu) = procfs::cpu_ns(&w.child.id().to_string()) {
                        let dt = w.cpu_prev.0.elapsed().as_secs_f64();
                        if dt > 0.5 {
                            w.max_share = w
                                .max_share
                                .max((cpu.saturating_sub(w.cpu_prev.1)) as f64 / 1e9 / dt);
                            w.cpu_prev = (Instant::now(), cpu);
                        }
                    }
                }
                let t = started.elapsed().as_secs();
                // The last second every worker has reported (this one's reports are on their
                // way).
                let delivered = seconds.at(t.saturating_sub(1)).unwrap_or(0);
                let srv = server_pid.as_deref().and_then(procfs::sample);
                eprintln!(
                    "[{t:>4}s {phase:<9}] open {open:>8}  delivered {delivered:>9}/s  p99 {:>8}  failures {failures}",
                    report::us(p99)
                );
                series.push(Point {
                    t_s: t,
                    open,
                    // Filled in from each second's reports once the run is over.
                    delivered_per_s: 0,
                    p99_us: p99,
                    server_rss_bytes: srv.as_ref().map(|s| s.rss_bytes),
                    server_open_files: srv.as_ref().map(|s| s.open_files),
                });
            }
        }
    };

    // Phase 1: connect.
    pump(
        &mut workers,
        c.connect_timeout,
        "connect",
        &mut |ws: &[Worker]| ws.iter().all(|w| w.ready),
    );
    let connect_elapsed = started.elapsed();
    let server_connected = sample_server();
    if !workers.iter().all(|w| w.ready) {
        eprintln!("causeloop-loadtest: not every connection finished its handshake within --connect-timeout");
    }

    // Phase 2: the scenario.
    let stop = Arc::new(AtomicBool::new(false));
    let mut published = publisher::Published::default();
    let mut window = Duration::ZERO;
    let events_before: u64 = workers.iter().map(|w| w.latest.events).sum();
    let mut server_window_start = server_connected;
    match scenario {
        Scenario::Connect => pump(&mut workers, c.duration, "hold", &mut |_| false),
        Scenario::Storm => {
            for w in workers.iter_mut() {
                let _ = writeln!(w.stdin, "drop");
            }
            std::thread::sleep(Duration::from_millis(50));
            pump(&mut workers, c.duration, "storm", &mut |ws: &[Worker]| {
                ws.iter().all(|w| {
                    w.latest.storm_recovered_ms.is_some() && w.latest.open > 0
                        || w.latest.attempts == 0
                })
            });
        }
        Scenario::Fanout | Scenario::Slow => {
            let f = fanout.as_ref().ok_or("fanout arguments")?;
            let key = std::env::var("CAUSELOOP_PUBLISH_KEY").unwrap_or_default();
            if f.rate > 0.0 && key.is_empty() {
                return Err(
                    "set CAUSELOOP_PUBLISH_KEY (the server's publish key) to publish".into(),
                );
            }
            let internal: SocketAddr = host_port(&c.internal)?
                .parse()
                .map_err(|e| format!("{e}"))?;
            let plan = publisher::Plan {
                internal,
                key,
                workspaces: c.workspaces.max(1),
                prefix: c.workspace_prefix.clone(),
                rate: f.rate,
                tick: f.tick,
                max_body: f.max_publish_bytes,
                pad: f.pad,
            };
            server_window_start = sample_server();
            let t0 = Instant::now();
            let handle = (f.rate > 0.0).then(|| {
                let stop = stop.clone();
                std::thread::spawn(move || publisher::run(&plan, stop))
            });
            pump(&mut workers, c.duration, "publish", &mut |_| false);
            stop.store(true, Ordering::Release);
            if let Some(h) = handle {
                published = h.join().unwrap_or_default();
            }
            window = t0.elapsed();
            // Let the last events arrive.
            pump(
                &mut workers,
                Duration::from_millis(500),
                "settle",
                &mut |_| false,
            );
        }
    }
    let server_end = sample_server();
    let open_end: u64 = workers.iter().map(|w| w.latest.open).sum();

    // Finish: final reports.
    for w in workers.iter_mut() {
        let _ = writeln!(w.stdin, "stop");
    }
    pump(
        &mut workers,
        Duration::from_secs(30),
        "finish",
        &mut |ws: &[Worker]| ws.iter().all(|w| w.final_report.is_some()),
    );
    let finals: Vec<WorkerReport> = workers
        .iter()
        .filter_map(|w| w.final_report.clone())
        .collect();
    if finals.len() != workers.len() {
        eprintln!(
            "causeloop-loadtest: {} of {} workers did not report",
            workers.len() - finals.len(),
            workers.len()
        );
    }
    let max_share = workers.iter().map(|w| w.max_share).fold(0.0, f64::max);
    for mut w in workers {
        drop(w.stdin);
        let _ = w.child.wait();
    }
    let (total, connect_hist, latency_hist, heartbeat_hist) = engine::merge(&finals);
    let self_cpu = procfs::cpu_ns("self")
        .unwrap_or(0)
        .saturating_sub(self_cpu_start)
        + procfs::children_cpu_ns();

    let delivered = total.events.saturating_sub(events_before);
    let server = match (
        c.server_pid,
        server_start,
        server_connected,
        server_window_start,
        server_end,
    ) {
        (Some(pid), Some(s0), Some(s1), Some(sw), Some(s2)) => Some(ServerFigures {
            pid,
            cpu_ns_per_connection: (total.connected > 0)
                .then(|| s1.cpu_ns.saturating_sub(s0.cpu_ns) as f64 / total.connected as f64),
            cpu_ns_per_frame: (delivered > 0 && fanout.is_some())
                .then(|| s2.cpu_ns.saturating_sub(sw.cpu_ns) as f64 / delivered as f64),
            rss_bytes_per_connection: (open_end > 0)
                .then(|| (s2.rss_bytes as f64 - s0.rss_bytes as f64) / open_end as f64),
            rss_bytes_start: s0.rss_bytes,
            rss_bytes_end: s2.rss_bytes,
            open_files_end: s2.open_files,
            rss_bytes_max: series
                .iter()
                .filter_map(|p| p.server_rss_bytes)
                .chain([s0.rss_bytes, s2.rss_bytes])
                .max()
                .unwrap_or(0),
            open_files_max: series
                .iter()
                .filter_map(|p| p.server_open_files)
                .chain([s0.open_files, s2.open_files])
                .max()
                .unwrap_or(0),
        }),
        _ => None,
    };
    let bottleneck_warning = report::bottleneck_warning(max_share);
    // Each second's delivered frames as the workers measured them (see `seconds`).
    for p in &mut series {
        p.delivered_per_s = seconds.at(p.t_s).unwrap_or(0);
    }
    let results = Results {
        scenario: format!("{scenario:?}").to_lowercase(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: procfs::machine(),
        date: utc_now(),
        processes,
        workspaces: c.workspaces,
        connect: ConnectFigures {
            requested: c.connections,
            attempts: total.attempts,
            connected: total.connected,
            rate_per_s: total.connected as f64 / connect_elapsed.as_secs_f64().max(1e-9),
            latency_us: Percentiles::of(&connect_hist),
            failures: total.failures.clone(),
        },
        fanout: fanout.as_ref().map(|_| FanoutFigures {
            published_events: published.events,
            delivered_frames: delivered,
            delivered_per_s: delivered as f64 / window.as_secs_f64().max(1e-9),
            lost: total.lost,
            reordered: total.reordered,
            repeated: total.repeated,
            compressed_frames: total.compressed_frames,
            bytes_received: total.bytes,
            gaps: total.gaps,
            latency_us: Percentiles::of(&latency_hist),
            publish_errors: published.errors.clone(),
            churned: total.churned,
        }),
        heartbeat_lateness_us: Percentiles::of(&heartbeat_hist),
        closes: total.closes.clone(),
        slow_connections: (scenario == Scenario::Slow)
            .then(|| (c.connections as f64 * slow_fraction).round() as u64),
        slow_closes: total.slow_closes.clone(),
        storm_recovered_ms: if scenario == Scenario::Storm {
            total.storm_recovered_ms
        } else {
            None
        },
        server,
        loadtest: SelfFigures {
            cpu_ns: self_cpu,
            worker_max_core_share: max_share,
            bottleneck_warning,
        },
        series,
        latency_curve: report::curve(&latency_hist),
    };
    println!("{}", results.table());
    if let Some(p) = &c.json {
        std::fs::write(
            p,
            serde_json::to_string_pretty(&results).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(p) = &c.report {
        std::fs::write(p, results.html()).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(0)
}

/// Now, as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days; no time zone database needed).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_ranges() {
        assert_eq!(
            parse_ips("127.0.0.2-127.0.0.4").unwrap(),
            vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        );
        assert_eq!(
            parse_ips("127.0.0.2,::1").unwrap(),
            vec!["127.0.0.2", "::1"]
        );
        assert!(parse_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_ips("nope").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(host_port("ws://127.0.0.1:4000").unwrap(), "127.0.0.1:4000");
        assert_eq!(
            host_port("http://127.0.0.1:4001/").unwrap(),
            "127.0.0.1:4001"
        );
    }
}
