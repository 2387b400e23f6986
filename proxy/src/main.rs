//! The `handoff` binary: configuration from the environment, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use handoff::{Config, Proxy};

mod cli;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("-h" | "--help" | "help") => {
            print!("{}", Config::help());
            return ExitCode::SUCCESS;
        }
        Some("healthcheck") => {
            return match args.next().as_deref() {
                None => healthcheck(),
                Some("-h" | "--help") => {
                    println!("usage: handoff healthcheck   (exit 0 if GET /healthz on HANDOFF_ADMIN_LISTEN answers 200)");
                    ExitCode::SUCCESS
                }
                Some(other) => {
                    eprintln!("handoff: healthcheck takes no argument, not '{other}'");
                    ExitCode::from(2)
                }
            };
        }
        Some("switchover") => return cli::switchover(args.collect()),
        Some("status") => return cli::status(args.collect()),
        Some("hold") => return cli::hold(args.collect()),
        Some("-V" | "--version") => {
            println!("handoff {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("handoff: unknown argument '{other}' (see handoff --help)");
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("handoff: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("handoff: configuration error: HANDOFF_LOG: {e}");
            return ExitCode::from(2);
        }
    };
    // Colour only on a terminal: a log file or a collector gets plain text (and
    // NO_COLOR turns it off on a terminal too).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR")
            .filter(|v| !v.is_empty())
            .is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colour)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handoff: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

/// `handoff healthcheck`: GET /healthz on the admin address (for container health
/// checks, so the image needs no HTTP client). Exit 0 when it answers 200.
fn healthcheck() -> ExitCode {
    use std::io::{Read, Write};
    let addr = std::env::var("HANDOFF_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:6480".into());
    let Ok(mut addr) = addr.parse::<std::net::SocketAddr>() else {
        eprintln!("healthcheck: HANDOFF_ADMIN_LISTEN '{addr}' is not an address");
        return ExitCode::FAILURE;
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let timeout = std::time::Duration::from_secs(3);
    let result = std::net::TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: handoff\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    });
    match result {
        Ok(resp) if resp.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(resp) => {
            eprintln!(
                "healthcheck: {}",
                resp.lines().next().unwrap_or("no response")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    let proxy = match Proxy::start(config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("handoff: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal(&proxy).await;
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

/// Waits for SIGTERM or SIGINT (or the console's SHUTDOWN); SIGHUP meanwhile reloads the
/// client TLS certificate and the users file.
async fn wait_for_signal(proxy: &Proxy) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler can be installed");
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received");
                return;
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the TLS certificate and the users file");
                let _ = proxy.reload_tls();
                let _ = proxy.reload_users();
            }
            _ = proxy.shutdown_requested() => {
                tracing::info!("SHUTDOWN from the admin console");
                return;
            }
            r = tokio::signal::ctrl_c() => {
                if r.is_ok() {
                    tracing::info!("SIGINT received");
                }
                return;
            }
        }
    }
}
