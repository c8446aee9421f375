//! The `causeloop-stream` binary: flags, logging, signals, `--dev` and `token`.
//!
//! Everything else is the library. SIGTERM and SIGINT begin the drain (a second one exits at
//! once); SIGHUP reloads every key file.

use causeloop_stream::auth::jwt;
use causeloop_stream::cli::{read_secret_file, Cli, Command, TokenArgs, ENV_HS256_SECRET};
use causeloop_stream::clock;
use causeloop_stream::config::Secret;
use causeloop_stream::server::Server;
use clap::{CommandFactory, FromArgMatches};
use std::io::Write;

mod dev;

fn main() {
    let matches = Cli::command().get_matches();
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
    let code = match cli.command {
        Some(Command::Token(args)) => token(&args),
        None => run(cli),
    };
    std::process::exit(code);
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
        server.shared().config.shards
    );
    if let Some(dev) = dev {
        dev.announce(&server);
        dev::spawn_demo_publisher(server.publisher());
    }

    let handle = signals.handle();
    let control = server.control();
    let signal_thread = std::thread::spawn(move || {
        let mut stopping = false;
        for sig in signals.forever() {
            match sig {
                signal_hook::consts::SIGHUP => match control.reload_keys() {
                    Ok(()) => log::info!("SIGHUP: keys reloaded"),
                    Err(e) => log::warn!("SIGHUP: keeping the old keys: {e}"),
                },
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
