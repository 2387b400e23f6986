//! Integration-test harness for handoff: real PostgreSQL clusters (a primary with
//! streaming standbys) started from the installed binaries on free loopback ports, the
//! proxy started in-process in front of them, and wait helpers with deadlines.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every server process
//! runs as the `postgres` user (or `HANDOFF_TEST_PG_USER`). Each cluster lives in a temp
//! directory that is removed when the cluster is dropped, or kept, with the server logs
//! printed, when the test is panicking.

#![forbid(unsafe_code)]

pub mod admin;
pub mod bypass;
pub mod chaos;
pub mod door;
pub mod etcd;
pub mod load;
pub mod netns;
pub mod paf;
pub mod patroni;
pub mod pg;
pub mod proxies;
pub mod raw;
pub mod repmgr;
pub mod setup;
pub mod tls;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use pg::{Cluster, Node, PgBin};

/// Starts handoff in-process in front of `cluster`'s primary, listening on free loopback
/// ports. `extra` adds or overrides `HANDOFF_*` variables.
///
/// Starts handoff in-process with `vars`, each overridden or added to by `extra` (a
/// proxy in front of an HA manager's cluster, say, whose `HANDOFF_SHARDS` lists no
/// hosts).
pub async fn start_proxy_with(
    vars: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<handoff::Proxy> {
    let mut vars = vars.to_vec();
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push((k, v));
    }
    let config = handoff::Config::from_vars(vars.iter().map(|(k, v)| (*k, *v)))?;
    test_log();
    Ok(handoff::Proxy::start(config).await?)
}

/// With `HANDOFF_TEST_LOG` set (a `tracing` filter such as `handoff=debug`), the
/// proxy's logs go to the test's stderr.
pub async fn start_proxy(cluster: &Cluster, extra: &[(&str, &str)]) -> Result<handoff::Proxy> {
    test_log();
    let shards = format!(
        "main={}",
        std::iter::once(&cluster.primary)
            .chain(&cluster.standbys)
            .map(|n| n.addr())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut vars: Vec<(String, String)> = vec![
        ("HANDOFF_LISTEN".into(), "127.0.0.1:0".into()),
        ("HANDOFF_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        ("HANDOFF_SHARDS".into(), shards),
        ("HANDOFF_SHUTDOWN_TIMEOUT".into(), "5s".into()),
    ];
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push((k.to_string(), v.to_string()));
    }
    let config = handoff::Config::from_vars(vars)?;
    Ok(handoff::Proxy::start(config).await?)
}

/// The `handoff` binary next to the running test binary (tests that need the real
/// process: signals, exit codes, its log output).
///
/// Built first, once per test process, when it is missing or older than the code it is
/// made from: `cargo test -p handoff-tests` does not rebuild another package's binary,
/// so a binary left from an earlier build would be tested instead of the current code.
/// A binary newer than every source (as `cargo test --workspace` leaves it) is used as
/// it is: building it again with this package's narrower features would rebuild half
/// the dependencies and relink it while other test binaries may be using it.
pub fn handoff_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("the test binary's path");
    // A test binary lives in target/<profile>/deps, a bench binary (handoff-bench)
    // beside handoff in target/<profile>.
    let dir = exe.parent().expect("the test binary's directory");
    let dir = match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().expect("target/<profile>"),
        _ => dir,
    };
    let bin = dir.join("handoff");
    BUILT.get_or_init(|| {
        let under_cargo = std::env::var_os("CARGO").is_some();
        if !bin.is_file() || (under_cargo && older_than_its_sources(&bin)) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build.args(["build", "-q", "-p", "handoff", "--bin", "handoff"]);
            if bin.parent().and_then(|p| p.file_name()) == Some("release".as_ref()) {
                build.arg("--release");
            }
            let ok = build.status().map(|s| s.success()).unwrap_or(false);
            assert!(ok, "building the handoff binary failed");
        }
    });
    bin
}

/// True if anything the binary is built from changed after it was written (or if
/// that cannot be told).
fn older_than_its_sources(bin: &std::path::Path) -> bool {
    fn newest(path: &std::path::Path, newest_seen: &mut std::time::SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                newest(&entry.path(), newest_seen);
            }
        } else if let Ok(modified) = meta.modified() {
            *newest_seen = (*newest_seen).max(modified);
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = std::time::SystemTime::UNIX_EPOCH;
    for part in [
        "Cargo.toml",
        "Cargo.lock",
        "proxy",
        "protocol/src",
        "protocol/Cargo.toml",
        "buffer/src",
        "buffer/Cargo.toml",
    ] {
        newest(&root.join(part), &mut sources);
    }
    sources > built
}

/// A command running the handoff binary with none of the environment's `HANDOFF_*`
/// variables (the harness's own `HANDOFF_TEST_*` among them: handoff refuses unknown
/// ones) and no takeover socket, so that only what the test sets applies.
pub fn handoff_command() -> std::process::Command {
    handoff_command_in(None)
}

/// [`handoff_command`] inside the network namespace `ns` (`ip netns exec`) when given.
pub fn handoff_command_in(ns: Option<&str>) -> std::process::Command {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(handoff_binary());
            c
        }
        None => std::process::Command::new(handoff_binary()),
    };
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HANDOFF_") {
            cmd.env_remove(k);
        }
    }
    // No takeover socket unless the test gives one (in its own directory): by default
    // it is a file in /tmp, which a process ended by SIGKILL leaves behind.
    cmd.env("HANDOFF_TAKEOVER_SOCKET", "off");
    cmd
}

/// Sends the signal `name` (`TERM`, `KILL`, `HUP`, `INT`, `STOP`, `CONT`) to process
/// `pid`, as `kill -NAME pid` would, by a system call: a fresh machine may have no
/// `kill` program (Debian's procps).
pub fn signal(pid: u32, name: &str) -> std::io::Result<()> {
    use rustix::process::Signal;
    let sig = match name {
        "TERM" => Signal::TERM,
        "KILL" => Signal::KILL,
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("no signal named {other}"),
            ))
        }
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such pid"))?;
    rustix::process::kill_process(pid, sig).map_err(std::io::Error::from)
}

/// The last `n` lines of the log at `path`, under a `--- name log ---` header (for a
/// failing test's output).
pub fn log_tail(name: &str, path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    let mut s = format!("--- {name} log, last lines ---\n");
    for l in lines.into_iter().rev() {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// SIGKILL to the postmaster of the data directory `data`, if one runs.
pub fn kill_postmaster(data: &std::path::Path) {
    let pid = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
    if let Some(pid) = pid {
        let _ = signal(pid, "KILL");
    }
}

/// With `HANDOFF_TEST_LOG` set (a `tracing` filter such as `handoff=debug`), the logs of
/// proxies started in-process go to the test's stderr.
pub fn test_log() {
    if let Ok(filter) = std::env::var("HANDOFF_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Sends the signal `name` to every process of the process group `pgid` (a program
/// started with `process_group(0)` and all it started).
pub fn signal_group(pgid: u32, name: &str) -> std::io::Result<()> {
    let sig = match name {
        "TERM" => rustix::process::Signal::TERM,
        "KILL" => rustix::process::Signal::KILL,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("no signal named {other} for a group"),
            ))
        }
    };
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such group"))?;
    rustix::process::kill_process_group(pid, sig).map_err(std::io::Error::from)
}

/// Polls `check` every 20 ms until it returns `Ok(true)` or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}: last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A PostgreSQL connection string for a host:port.
pub fn conn_str(
    addr: &std::net::SocketAddr,
    user: &str,
    db: &str,
    password: Option<&str>,
) -> String {
    let mut s = format!(
        "host={} port={} user={user} dbname={db} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    if let Some(p) = password {
        s.push_str(&format!(" password={p}"));
    }
    s
}
