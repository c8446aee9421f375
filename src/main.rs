//! The `causeloop-stream` binary: flags, logging, signals, `--dev` and `token`.
//!
//! Everything else is the library. SIGTERM and SIGINT begin the drain (a second one exits at
//! once); SIGHUP reloads every key file and the TLS certificate pair.
#![forbid(unsafe_code)]

use causeloop_stream::auth::jwt;
use causeloop_stream::cli::{
    read_secret_file, Cli, Command, HealthcheckArgs, TokenArgs, ENV_HS256_SECRET,
};
use causeloop_stream::clock;
use causeloop_stream::config::Secret;
use causeloop_stream::server::Server;
use clap::{CommandFactory, FromArgMatches};
use std::io::Write;

mod dev;

fn main() {
    let (matches, from_file) = with_config_file(Cli::command().get_matches());
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // A first try should not expose a server with throw-away secrets to the network: under
    // --dev the public listener defaults to loopback unless --listen (or its env twin) is given.
    if cli.run.dev
        && matches.value_source("listen") == Some(clap::parser::ValueSource::DefaultValue)
    {
        cli.run.listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    if cli.run.print_config {
        print!("{}", effective_config(&matches, &from_file));
        std::process::exit(0);
    }
    let code = match cli.command {
        Some(Command::Token(args)) => token(&args),
        Some(Command::Healthcheck(args)) => healthcheck(&args),
        None => run(cli),
    };
    std::process::exit(code);
}

/// The server flags: (id, takes a value), excluding the meta flags.
fn server_flags() -> Vec<(String, bool)> {
    Cli::command()
        .get_arguments()
        .filter(|a| {
            !matches!(
                a.get_id().as_str(),
                "config" | "print_config" | "help" | "version"
            )
        })
        .filter(|a| a.get_long().is_some())
        .map(|a| (a.get_id().to_string(), a.get_action().takes_values()))
        .collect()
}

/// Applies `--config FILE`: re-parses the command line with the file's values added for the
/// flags that neither the command line nor the environment set.
fn with_config_file(matches: clap::ArgMatches) -> (clap::ArgMatches, Vec<String>) {
    let Some(path) = matches.get_one::<std::path::PathBuf>("config").cloned() else {
        return (matches, Vec::new());
    };
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("causeloop-stream: {shown}: {e}");
            std::process::exit(2);
        }
    };
    let extra =
        match causeloop_stream::config_file::arguments(&shown, &text, &matches, &server_flags()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("causeloop-stream: {e}");
                std::process::exit(2);
            }
        };
    let from_file: Vec<String> = extra
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|f| f.replace('-', "_"))
        .collect();
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    argv.extend(extra.into_iter().map(Into::into));
    (Cli::command().get_matches_from(argv), from_file)
}

/// The effective configuration as TOML, each value with where it came from. Secrets given
/// inline through the environment are never printed, only whether they are set.
fn effective_config(matches: &clap::ArgMatches, from_file: &[String]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "# causeloop-stream effective configuration (flag > environment > file > default)\n",
    );
    for (id, takes_value) in server_flags() {
        let source = match matches.value_source(&id) {
            Some(clap::parser::ValueSource::CommandLine) if from_file.contains(&id) => "file",
            Some(clap::parser::ValueSource::CommandLine) => "flag",
            Some(clap::parser::ValueSource::EnvVariable) => "environment",
            Some(clap::parser::ValueSource::DefaultValue) => "default",
            _ => "unset",
        };
        let key = id.replace('_', "-");
        let values: Vec<String> = matches
            .get_raw(&id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if !takes_value {
            let on = matches.get_flag(&id);
            let _ = writeln!(out, "{key} = {on}  # {source}");
        } else if values.is_empty() {
            let _ = writeln!(out, "# {key} is not set");
        } else if values.len() == 1 && id != "jwt_rs256_public_key" {
            let _ = writeln!(out, "{key} = {:?}  # {source}", values[0]);
        } else {
            let _ = writeln!(out, "{key} = {values:?}  # {source}");
        }
    }
    for env in [
        causeloop_stream::cli::ENV_HS256_SECRET,
        causeloop_stream::cli::ENV_PUBLISH_KEY,
    ] {
        let set = std::env::var_os(env).is_some_and(|v| !v.is_empty());
        let _ = writeln!(
            out,
            "# {env}: {}",
            if set { "set (redacted)" } else { "not set" }
        );
    }
    out
}

/// `healthcheck`: 0 if the internal listener answers `/healthz` with 200 within the timeout.
fn healthcheck(args: &HealthcheckArgs) -> i32 {
    use std::io::{Read, Write};
    let mut addr = args.internal_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let answer = (|| -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, args.timeout)?;
        s.set_read_timeout(Some(args.timeout))?;
        s.set_write_timeout(Some(args.timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head)?;
        head.truncate(n);
        Ok(head)
    })();
    match answer {
        Ok(head) if head.starts_with(b"HTTP/1.1 200") => 0,
        Ok(head) => {
            eprintln!(
                "causeloop-stream healthcheck: {addr}: {}",
                String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("no answer")
            );
            1
        }
        Err(e) => {
            eprintln!("causeloop-stream healthcheck: {addr}: {e}");
            1
        }
    }
}

fn token(args: &TokenArgs) -> i32 {
    let secret = match &args.secret_file {
        Some(p) => read_secret_file(p),
        None => match std::env::var_os(ENV_HS256_SECRET).filter(|v| !v.is_empty()) {
            Some(v) => Ok(Secret::from(v.into_encoded_bytes())),
            None => match std::env::var_os("CAUSELOOP_JWT_HS256_SECRET_FILE") {
                Some(p) => read_secret_file(std::path::Path::new(&p)),
                None => Err(format!(
                    "no secret: pass --secret-file or set {ENV_HS256_SECRET}"
                )),
            },
        },
    };
    let secret = match secret {
        Ok(s) => s,
        Err(e) => {
            eprintln!("causeloop-stream token: {e}");
            return 2;
        }
    };
    let now = clock::now_secs();
    let claims = jwt::claims_json(
        &args.workspace_claim,
        &args.workspace,
        &args.user,
        now,
        now + args.ttl.as_secs(),
    );
    println!("{}", jwt::sign_hs256(secret.expose(), &claims));
    0
}

fn run(cli: Cli) -> i32 {
    let args = cli.run;
    causeloop_stream::logging::init(args.log_level, args.log_format);

    let mut config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("causeloop-stream: {e}");
            return 2;
        }
    };
    let dev = if args.dev {
        Some(dev::prepare(&mut config))
    } else {
        None
    };
    if config.publish_key.is_none() {
        eprintln!("causeloop-stream: no publish key: set --publish-key-file or CAUSELOOP_PUBLISH_KEY (or try --dev)");
        return 2;
    }
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("causeloop-stream: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let server = match Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("causeloop-stream: {e}");
            return 1;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening public={}", server.public_addr());
        let _ = writeln!(out, "listening internal={}", server.internal_addr());
        let _ = out.flush();
    }
    log::info!(
        "causeloop-stream {} serving on {} (internal {}) with {} shard(s)",
        env!("CARGO_PKG_VERSION"),
        server.public_addr(),
        server.internal_addr(),
        server.config().shards
    );
    if let Some(dev) = dev {
        let mut dev = dev;
        dev.announce(&server);
        dev.spawn_page_publisher(server.publisher());
        dev::spawn_demo_publisher(server.publisher());
    }

    let handle = signals.handle();
    let control = server.control();
    let signal_thread = std::thread::spawn(move || {
        let mut stopping = false;
        for sig in signals.forever() {
            match sig {
                signal_hook::consts::SIGHUP => {
                    match control.reload_keys() {
                        Ok(()) => log::info!("SIGHUP: keys reloaded"),
                        Err(e) => log::warn!("SIGHUP: keeping the old keys: {e}"),
                    }
                    match control.reload_tls() {
                        Ok(true) => log::info!("SIGHUP: TLS certificate reloaded"),
                        Ok(false) => {}
                        Err(e) => log::warn!("SIGHUP: keeping the old TLS certificate: {e}"),
                    }
                }
                _ if stopping => {
                    log::warn!("second stop signal: exiting without finishing the drain");
                    std::process::exit(1);
                }
                _ => {
                    stopping = true;
                    log::info!("stop signal: draining (send it again to exit at once)");
                    control.shutdown();
                }
            }
        }
    });
    server.wait();
    handle.close();
    let _ = signal_thread.join();
    log::info!("drained; exiting");
    0
}
