//! `handoff-bench takeover`: the proxy replaced under load, again and again — handoff's
//! takeover (`handoff --takeover`, both pool modes) beside PgBouncer's online restart
//! (`pgbouncer -R`), in one run against one PostgreSQL.
//!
//! Each target runs pgbench (tpcb, `--clients`) twice for the same time: once
//! undisturbed, once with `--takeovers` replacements `--every` apart. For each it
//! reports clients aborted, transactions, the longest transaction (from pgbench's
//! per-transaction log), how long each replacement took (from starting the new process
//! to the old one's exit) and the old process's resident memory when it last had any.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_tests::Cluster;
use tokio::time::Instant;

use crate::compare::{handoff_command, pgbouncer_binary, wait_listening, Kill};

/// Options of `handoff-bench takeover`.
#[derive(Debug, clap::Parser)]
#[command(name = "handoff-bench takeover")]
pub struct Args {
    /// pgbench clients (tpcb).
    #[arg(long, default_value_t = 32)]
    pub clients: u32,
    /// Replacements in each run.
    #[arg(long, default_value_t = 10)]
    pub takeovers: u32,
    /// Time between two replacements (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub every: f64,
    /// Which proxies: handoff (transaction mode), handoff-session, pgbouncer.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "handoff,handoff-session,pgbouncer"
    )]
    pub targets: Vec<String>,
    /// pgbench scale.
    #[arg(long, default_value_t = 1)]
    pub scale: u32,
}

/// What one pgbench run saw.
#[derive(Debug, Default)]
struct Bench {
    transactions: u64,
    aborted: u32,
    /// The longest transaction (µs).
    longest_us: u64,
}

/// One replacement: how long it took, and the old process's last resident memory.
#[derive(Debug)]
struct Replacement {
    took: Duration,
    rss_kb: Option<u64>,
}

/// A proxy that can be started and replaced.
trait Target {
    fn port(&self) -> u16;
    /// Starts a process: the first (`replacing` false), or one that takes the running
    /// one's place.
    fn spawn(&self, replacing: bool) -> Result<Kill>;
}

struct Handoff {
    bin: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
}

impl Target for Handoff {
    fn port(&self) -> u16 {
        self.port
    }
    fn spawn(&self, takeover: bool) -> Result<Kill> {
        let mut cmd = handoff_command(&self.bin);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null());
        if takeover {
            cmd.arg("--takeover");
        }
        Ok(Kill::new(cmd.spawn().context("starting handoff")?))
    }
}

struct PgBouncer {
    bin: PathBuf,
    ini: PathBuf,
    dir: PathBuf,
    port: u16,
    pg: handoff_tests::PgBin,
}

impl Target for PgBouncer {
    fn port(&self) -> u16 {
        self.port
    }
    fn spawn(&self, restart: bool) -> Result<Kill> {
        let mut cmd = self.pg.command_as_server_user(&self.bin, &self.dir);
        if restart {
            cmd.arg("-R");
        }
        let child = cmd
            .arg(&self.ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?;
        Ok(Kill::new(child))
    }
}

/// The resident memory of process `pid` (kB), while it runs.
fn rss_kb(pid: u32) -> Option<u64> {
    crate::run::status_kib(pid, "VmRSS")
}

/// Whether process `pid` has exited (or is a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// pgbench tpcb through `port` for `secs`, its per-transaction log under `prefix`.
fn pgbench(
    cluster: &Cluster,
    port: u16,
    clients: u32,
    secs: u32,
    prefix: &Path,
) -> Result<std::process::Child> {
    cluster
        .pgbench(port)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-n",
        ])
        .args(["-l", "--log-prefix"])
        .arg(prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pgbench")
}

/// Reads a finished pgbench's output and per-transaction logs.
fn read_bench(out: std::process::Output, prefix: &Path) -> Result<Bench> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut b = Bench {
        aborted: stderr.lines().filter(|l| l.contains("aborted")).count() as u32,
        ..Bench::default()
    };
    b.transactions = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("pgbench said: {stdout}{stderr}"))?;
    let dir = prefix.parent().context("a log directory")?;
    let stem = prefix
        .file_name()
        .context("a log prefix")?
        .to_string_lossy()
        .to_string();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&stem) {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())?.lines() {
            // client transaction latency_us script epoch epoch_us
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                b.longest_us = b.longest_us.max(us);
            }
        }
        std::fs::remove_file(entry.path())?;
    }
    Ok(b)
}

/// Waits until process `pid` has exited, sampling its memory: the last sample.
async fn wait_exit(pid: u32, within: Duration) -> Result<Option<u64>> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while !gone(pid) {
        if Instant::now() > deadline {
            bail!("the replaced process {pid} did not exit within {within:?}");
        }
        last = rss_kb(pid).or(last);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(last)
}

/// One target: a run without replacements, then one with them.
async fn measure(
    cluster: &Cluster,
    name: &str,
    target: &dyn Target,
    args: &Args,
    logs: &Path,
) -> Result<(Bench, Bench, Vec<Replacement>)> {
    let secs = 3 + (f64::from(args.takeovers) * args.every).ceil() as u32;
    let mut proc = target.spawn(false)?;
    wait_listening(target.port(), name).await?;
    let prefix = logs.join(format!("{name}-quiet"));
    let quiet = pgbench(cluster, target.port(), args.clients, secs, &prefix)?;
    let quiet = tokio::task::spawn_blocking(move || quiet.wait_with_output()).await??;
    let quiet = read_bench(quiet, &prefix)?;

    let prefix = logs.join(format!("{name}-replaced"));
    let busy = pgbench(cluster, target.port(), args.clients, secs, &prefix)?;
    let waiter = tokio::task::spawn_blocking(move || busy.wait_with_output());
    let mut replacements = Vec::new();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..args.takeovers {
        let started = Instant::now();
        let old = proc.pid();
        let next = target.spawn(true)?;
        let rss = wait_exit(old, Duration::from_secs(60)).await?;
        replacements.push(Replacement {
            took: started.elapsed(),
            rss_kb: rss,
        });
        drop(std::mem::replace(&mut proc, next));
        let rest = Duration::from_secs_f64(args.every).saturating_sub(started.elapsed());
        tokio::time::sleep(rest).await;
    }
    let busy = read_bench(waiter.await??, &prefix)?;
    drop(proc);
    Ok((quiet, busy, replacements))
}

pub async fn run(args: Args) -> Result<()> {
    println!("starting a PostgreSQL primary...");
    let cluster = tokio::task::block_in_place(|| Cluster::start(0))?;
    cluster.pgbench_init(args.scale)?;
    let logs = cluster.dir().join("takeover-logs");
    std::fs::create_dir_all(&logs)?;
    let bin = std::env::current_exe()?.with_file_name("handoff");
    let mut rows = Vec::new();
    for name in &args.targets {
        let port = handoff_tests::pg::free_port()?;
        let target: Box<dyn Target> = match name.as_str() {
            "handoff" | "handoff-session" => {
                if !bin.is_file() {
                    bail!(
                        "{} not found: cargo build --release -p handoff",
                        bin.display()
                    );
                }
                let admin = handoff_tests::pg::free_port()?;
                let mode = if name == "handoff" {
                    "transaction"
                } else {
                    "session"
                };
                let env = [
                    ("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr())),
                    ("HANDOFF_LISTEN", format!("127.0.0.1:{port}")),
                    ("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
                    ("HANDOFF_POOL_SIZE", "20".into()),
                    ("HANDOFF_POOL_MODE", mode.into()),
                    ("HANDOFF_LOG", "warn".into()),
                    (
                        "HANDOFF_TAKEOVER_SOCKET",
                        logs.join(format!("{name}.takeover")).display().to_string(),
                    ),
                ];
                Box::new(Handoff {
                    bin: bin.clone(),
                    env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                    port,
                })
            }
            "pgbouncer" => {
                let Some(pgb) = pgbouncer_binary() else {
                    eprintln!("pgbouncer is not installed: left out");
                    continue;
                };
                let dir = cluster.dir().join("pgbouncer-takeover");
                std::fs::create_dir_all(&dir)?;
                cluster.bin.give_to_server_user(&dir)?;
                let ini = dir.join("pgbouncer.ini");
                let users = dir.join("users.txt");
                std::fs::write(&users, "\"postgres\" \"\"\n")?;
                // The online restart goes through the Unix socket of PgBouncer's console.
                std::fs::write(
                    &ini,
                    format!(
                        "[databases]\n* = host=127.0.0.1 port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
                         listen_port = {port}\nauth_type = trust\nauth_file = {}\npool_mode = transaction\n\
                         max_client_conn = 2000\ndefault_pool_size = 20\nunix_socket_dir = {}\n\
                         logfile = {}\n",
                        cluster.primary.port,
                        users.display(),
                        dir.display(),
                        dir.join("pgbouncer.log").display()
                    ),
                )?;
                cluster.bin.give_to_server_user(&ini)?;
                cluster.bin.give_to_server_user(&users)?;
                Box::new(PgBouncer {
                    bin: pgb,
                    ini,
                    dir,
                    port,
                    pg: cluster.bin.clone(),
                })
            }
            other => bail!("unknown target '{other}' (handoff, handoff-session, pgbouncer)"),
        };
        println!(
            "{name}: {} clients, {} replacements {}s apart...",
            args.clients, args.takeovers, args.every
        );
        let (quiet, busy, reps) = measure(&cluster, name, target.as_ref(), &args, &logs).await?;
        rows.push((name.clone(), quiet, busy, reps));
    }
    println!();
    println!(
        "{:<16} {:>8} {:>10} {:>10} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "target",
        "aborted",
        "xacts",
        "xacts",
        "longest",
        "longest",
        "replacement",
        "replacement",
        "old RSS"
    );
    println!(
        "{:<16} {:>8} {:>10} {:>10} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "", "", "(replaced)", "(quiet)", "(replaced)", "(quiet)", "median", "max", "max"
    );
    for (name, quiet, busy, reps) in &rows {
        let mut took: Vec<Duration> = reps.iter().map(|r| r.took).collect();
        took.sort();
        let median = took.get(took.len() / 2).copied().unwrap_or_default();
        let max = took.last().copied().unwrap_or_default();
        let rss = reps.iter().filter_map(|r| r.rss_kb).max().unwrap_or(0);
        println!(
            "{:<16} {:>5}/{:<2} {:>10} {:>10} {:>10.1}ms {:>10.1}ms {:>12.0}ms {:>12.0}ms {:>9.1} MB",
            name,
            busy.aborted,
            args.clients,
            busy.transactions,
            quiet.transactions,
            busy.longest_us as f64 / 1000.0,
            quiet.longest_us as f64 / 1000.0,
            median.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            rss as f64 / 1024.0,
        );
    }
    Ok(())
}
