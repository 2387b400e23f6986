//! The `handoff` binary: configuration from the environment, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use handoff::{Config, Proxy};

mod cli;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // One source of usage: clap's, from the subcommands' definitions, with every
    // variable after it.
    let matches = cli::Cli::command().after_help(Config::help()).get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Some(command) = cli.command {
        return cli::run(command);
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
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("handoff: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, cli.takeover))
}

async fn run(config: Config, takeover: bool) -> ExitCode {
    // Installed before startup, which may take a while (probing the shards, asking an HA
    // manager): a SIGTERM meanwhile is seen once the proxy runs, and stops it cleanly.
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("handoff: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = if takeover {
        Proxy::take_over(config).await.map_err(|e| e.to_string())
    } else {
        Proxy::start(config).await.map_err(|e| e.to_string())
    };
    let proxy = match started {
        Ok(p) => p,
        Err(e) => {
            eprintln!("handoff: {e}");
            return ExitCode::FAILURE;
        }
    };
    cli::takeover::notify_ready();
    wait_for_signal(&proxy, signals).await;
    proxy.shutdown().await;
    ExitCode::SUCCESS
}

/// The signals handoff acts on, listened to from the start.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Waits for SIGTERM or SIGINT (or the console's SHUTDOWN); SIGHUP meanwhile reloads the
/// client TLS certificate and the users file.
async fn wait_for_signal(proxy: &Proxy, signals: Signals) {
    let Signals {
        mut term,
        mut hup,
        mut int,
    } = signals;
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
            _ = proxy.handed_over() => {
                return;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received");
                return;
            }
        }
    }
}
