//! `handoff-bench crowd` and `handoff-bench storm`: many clients at once, handoff and
//! PgBouncer side by side in one run against the same PostgreSQL server.
//!
//! - **crowd**: `--clients` connected clients each running point selects on a fixed
//!   schedule (open loop: the total rate is `--rate`, each client sends every
//!   `clients / rate` seconds, spread evenly), so a slow proxy cannot slow the offered
//!   load down. A request's latency counts from when it was due: a client still waiting
//!   for its previous answer sends late, and the wait is charged to the proxy
//!   (coordinated omission). Reported: p50/p99/p99.9/max latency, what was served,
//!   errors, the proxy's CPU per transaction, and fairness — how evenly the clients
//!   were served: the spread of their mean latencies and of their completed counts.
//! - **storm**: `--clients` clients logging in at the same moment (as after a failover
//!   or a deploy), each running one `SELECT 1` once in: how long until all were
//!   served, the spread of the login times, errors, and the proxy's CPU per login; with
//!   SCRAM-SHA-256 (both proxies given the same verifier) and with trust.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_protocol::backend::TransactionStatus;
use handoff_tests::raw::RawClient;
use handoff_tests::Cluster;
use tokio::time::Instant;

use crate::compare::{pgbouncer_binary, start_pgbouncer_at, wait_listening, Kill, PgBouncerOpts};
use crate::run::{cpu_time, peak_rss_mib};

/// What both subcommands run: the targets, their pools, how many rounds.
#[derive(Debug, Clone, clap::Args)]
pub struct Sides {
    /// Server connections per pool, for both poolers.
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    /// Runs per target, alternating between the targets.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// `handoff`, `handoff-1thread` (`HANDOFF_WORKER_THREADS=1`), `pgbouncer`, and
    /// `baseline` (the `--baseline` binary: an earlier build, for alternating runs).
    #[arg(long, value_delimiter = ',', default_value = "handoff,pgbouncer")]
    pub targets: Vec<String>,
    /// Another handoff binary, run as target `baseline`.
    #[arg(long)]
    pub baseline: Option<std::path::PathBuf>,
}

/// Options of `handoff-bench crowd`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench crowd")]
pub struct CrowdArgs {
    /// Connected clients, each on its own schedule.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Transactions per second offered by all the clients together.
    #[arg(long, default_value_t = 4_000)]
    pub rate: u32,
    /// How long the schedule runs once every client is logged in.
    #[arg(long, default_value = "30s", value_parser = crate::run::events::parse_duration)]
    pub duration: Duration,
    #[command(flatten)]
    pub sides: Sides,
}

/// Options of `handoff-bench storm`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench storm")]
pub struct StormArgs {
    /// Clients that log in at the same moment.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// `scram`, `trust` (each run for every target).
    #[arg(long, value_delimiter = ',', default_value = "scram,trust")]
    pub auth: Vec<String>,
    /// How long a client may take to be served before it counts as an error.
    #[arg(long, default_value = "120s", value_parser = crate::run::events::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub sides: Sides,
}

/// The user both proxies' SCRAM logins use, and its password.
const SCRAM_USER: &str = "storm";
const SCRAM_PASSWORD: &str = "storm-password";

/// How clients log in to a proxy under test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Auth<'a> {
    Trust,
    /// The SCRAM-SHA-256 verifier PostgreSQL made for [`SCRAM_USER`].
    Scram(&'a str),
}

/// Raises this process's open-file limit for `clients` sockets (the proxies started
/// from here inherit it).
fn raise_nofile(clients: usize) -> Result<()> {
    let need = clients as u64 + 500;
    if rlimit::getrlimit(rlimit::Resource::NOFILE)?.1 < need {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, need, need);
    }
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    if limit < need {
        bail!(
            "the open-file limit is {limit}; {clients} clients need {need} (raise the hard limit)"
        );
    }
    Ok(())
}

/// Starts `target` in front of the cluster's primary on a new port, with
/// `sides.pool_size` server connections, taking `clients` clients; handoff in
/// `pool_mode` at its default log level (PgBouncer in transaction mode).
pub(crate) async fn start_target(
    cluster: &Cluster,
    target: &str,
    clients: usize,
    sides: &Sides,
    auth: Auth<'_>,
    pool_mode: &str,
) -> Result<(Kill, u16)> {
    let pool_size = sides.pool_size;
    let port = handoff_tests::pg::free_port()?;
    let proxy = match target {
        "handoff" | "handoff-1thread" | "baseline" => {
            let admin = handoff_tests::pg::free_port()?;
            let bin = match (target, &sides.baseline) {
                ("baseline", Some(b)) => b.clone(),
                ("baseline", None) => bail!("target baseline needs --baseline <handoff binary>"),
                _ => std::env::current_exe()?.with_file_name("handoff"),
            };
            if !bin.is_file() {
                bail!(
                    "{} not found: build it first (cargo build --release -p handoff -p handoff-bench)",
                    bin.display()
                );
            }
            let mut cmd = crate::compare::handoff_command(&bin);
            cmd.env("HANDOFF_SHARDS", format!("main={}", cluster.primary.addr()))
                .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
                .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
                .env("HANDOFF_POOL_SIZE", pool_size.to_string())
                .env("HANDOFF_MAX_CLIENT_CONN", (clients + 10).to_string())
                .env("HANDOFF_POOL_MODE", pool_mode)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(cluster.dir().join("handoff.log"))?);
            if target == "handoff-1thread" {
                cmd.env("HANDOFF_WORKER_THREADS", "1");
            }
            if let Auth::Scram(verifier) = auth {
                cmd.env("HANDOFF_USERS", format!("{SCRAM_USER}={verifier}"));
            }
            Kill::new(cmd.spawn().context("starting handoff")?)
        }
        "pgbouncer" => {
            let Some(bin) = pgbouncer_binary() else {
                bail!("pgbouncer is not installed (apt-get install pgbouncer)");
            };
            let scram = match auth {
                Auth::Scram(v) => Some((SCRAM_USER, v)),
                Auth::Trust => None,
            };
            start_pgbouncer_at(
                &cluster.bin,
                cluster.dir(),
                cluster.primary.port,
                &bin,
                port,
                PgBouncerOpts {
                    pool_size,
                    admin: false,
                    max_clients: clients + 10,
                    scram,
                },
            )?
        }
        other => bail!("unknown target '{other}' (handoff, handoff-1thread, baseline, pgbouncer)"),
    };
    if let Err(e) = wait_listening(port, target).await {
        let log = std::fs::read_to_string(cluster.dir().join("handoff.log")).unwrap_or_default();
        bail!(
            "{e}\n{}",
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    Ok((proxy, port))
}

/// A simple-protocol Query message.
fn query_message(sql: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(sql.len() + 6);
    m.push(b'Q');
    m.extend_from_slice(&(sql.len() as i32 + 5).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// A peak RSS for the report: MiB with one decimal, `?` when unknown.
fn mib(v: Option<f64>) -> String {
    v.map_or("?".into(), |m| format!("{m:.1} MiB"))
}

/// Percentile `p` (0..=1) of sorted `v`.
fn pct<T: Copy + Default>(v: &[T], p: f64) -> T {
    if v.is_empty() {
        return T::default();
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One client's record in a crowd run.
#[derive(Debug, Default)]
struct ClientLog {
    /// Latencies (µs) of the requests due inside the window that were answered.
    latencies: Vec<u32>,
    errors: u32,
    first_error: Option<String>,
}

/// One crowd run's figures.
#[derive(Debug)]
struct CrowdResult {
    target: String,
    offered: f64,
    served_tps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    errors: u64,
    cpu_us: Option<f64>,
    /// The proxy's peak resident set over the run (logins included), MiB.
    peak_rss_mib: Option<f64>,
    /// Per-client mean latency (ms): median, p99, max over the clients.
    mean_spread: (f64, f64, f64),
    /// Per-client completed requests: min, median, max.
    count_spread: (usize, usize, usize),
    /// Jain's fairness index of per-client completed requests (1 = all equal).
    jain: f64,
}

pub async fn crowd(args: CrowdArgs) -> Result<()> {
    if args.rate == 0 || args.clients == 0 {
        bail!("--rate and --clients must be at least 1");
    }
    raise_nofile(args.clients)?;
    let cluster = tokio::task::block_in_place(|| -> Result<Cluster> {
        let c = Cluster::start(0)?;
        c.pgbench_init(1)?;
        Ok(c)
    })?;
    let period = Duration::from_secs_f64(args.clients as f64 / f64::from(args.rate));
    println!(
        "crowd: {} clients, {} tps offered (each every {:.2} s), {:?} per run, pool {}",
        args.clients,
        args.rate,
        period.as_secs_f64(),
        args.duration,
        args.sides.pool_size
    );
    let mut results = Vec::new();
    // Source addresses 127.20-99.x.1 (idle's runs use 127.1-2).
    let mut run_no: u8 = 19;
    for _ in 0..args.sides.rounds {
        for target in &args.sides.targets {
            run_no = if run_no >= 99 { 20 } else { run_no + 1 };
            let r = crowd_once(&cluster, target, &args, period, run_no).await?;
            println!(
                "{:<10} served {:.0} tps; p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms; {} errors; {}; peak RSS {}",
                r.target,
                r.served_tps,
                r.p50,
                r.p99,
                r.p999,
                r.max,
                r.errors,
                r.cpu_us.map_or("cpu ?".into(), |c| format!("{c:.1} µs CPU per txn")),
                mib(r.peak_rss_mib),
            );
            results.push(r);
        }
    }
    println!();
    println!("| target | offered tps | served tps | p50 ms | p99 ms | p99.9 ms | max ms | errors | proxy CPU µs/txn | proxy peak RSS | per-client mean latency ms: median / p99 / max | per-client txns: min / median / max | Jain's index |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {:.2} / {:.2} / {:.2} | {} / {} / {} | {:.4} |",
            r.target,
            r.offered,
            r.served_tps,
            r.p50,
            r.p99,
            r.p999,
            r.max,
            r.errors,
            r.cpu_us.map_or("?".into(), |c| format!("{c:.1}")),
            mib(r.peak_rss_mib),
            r.mean_spread.0,
            r.mean_spread.1,
            r.mean_spread.2,
            r.count_spread.0,
            r.count_spread.1,
            r.count_spread.2,
            r.jain,
        );
    }
    ratios(&results, |r| r.p99, "p99 latency");
    ratios(&results, |r| r.p999, "p99.9 latency");
    ratios(
        &results,
        |r| r.cpu_us.unwrap_or(f64::NAN),
        "CPU per transaction",
    );
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

/// Each handoff build's `f` over PgBouncer's, per round (runs in the order they were
/// made).
fn ratios<R>(results: &[R], f: impl Fn(&R) -> f64, what: &str)
where
    R: Named,
{
    let of = |name: &str| -> Vec<f64> {
        results
            .iter()
            .filter(|r| r.name() == name)
            .map(&f)
            .collect()
    };
    let p = of("pgbouncer");
    for name in ["handoff", "handoff-1thread", "baseline"] {
        let h = of(name);
        if h.is_empty() || p.is_empty() {
            continue;
        }
        let each: Vec<String> = h
            .iter()
            .zip(&p)
            .map(|(h, p)| format!("{:.2}", h / p))
            .collect();
        println!("{name} / PgBouncer, {what}: {}", each.join(" / "));
    }
}

trait Named {
    fn name(&self) -> &str;
}

impl Named for CrowdResult {
    fn name(&self) -> &str {
        &self.target
    }
}

async fn crowd_once(
    cluster: &Cluster,
    target: &str,
    args: &CrowdArgs,
    period: Duration,
    run_no: u8,
) -> Result<CrowdResult> {
    let (proxy, port) = start_target(
        cluster,
        target,
        args.clients,
        &args.sides,
        Auth::Trust,
        "transaction",
    )
    .await?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // Log everyone in, 200 at a time, before the schedule starts.
    let mut clients = Vec::with_capacity(args.clients);
    log_in(&mut clients, args.clients, 200, addr, target, run_no, &[]).await?;
    // Quiet for a moment: what follows is the crowd, not the logins.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_time(proxy.pid());
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + args.duration;
    let n = clients.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, client) in clients.into_iter().enumerate() {
        let phase = period.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(crowd_client(
            client,
            i,
            start + phase,
            period,
            end,
        )));
    }
    let mut logs = Vec::with_capacity(n);
    for t in tasks {
        logs.push(t.await?);
    }
    let cpu_after = cpu_time(proxy.pid());
    let peak_rss_mib = peak_rss_mib(proxy.pid());
    drop(proxy);
    let mut all: Vec<u32> = logs
        .iter()
        .flat_map(|l| l.latencies.iter().copied())
        .collect();
    all.sort_unstable();
    let errors: u64 = logs.iter().map(|l| u64::from(l.errors)).sum();
    if let Some(e) = logs.iter().find_map(|l| l.first_error.as_ref()) {
        eprintln!("{target}: {errors} errors, the first: {e}");
    }
    let secs = args.duration.as_secs_f64();
    let mut means: Vec<f64> = logs
        .iter()
        .filter(|l| !l.latencies.is_empty())
        .map(|l| {
            l.latencies.iter().map(|&v| f64::from(v)).sum::<f64>()
                / l.latencies.len() as f64
                / 1000.0
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let mut counts: Vec<usize> = logs.iter().map(|l| l.latencies.len()).collect();
    counts.sort_unstable();
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    let ms = |us: u32| f64::from(us) / 1000.0;
    Ok(CrowdResult {
        target: target.to_string(),
        offered: f64::from(args.rate),
        served_tps: all.len() as f64 / secs,
        p50: ms(pct(&all, 0.5)),
        p99: ms(pct(&all, 0.99)),
        p999: ms(pct(&all, 0.999)),
        max: ms(all.last().copied().unwrap_or_default()),
        errors,
        peak_rss_mib,
        cpu_us: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if !all.is_empty() => {
                Some((a - b).as_secs_f64() * 1e6 / all.len() as f64)
            }
            _ => None,
        },
        mean_spread: (
            pct(&means, 0.5),
            pct(&means, 0.99),
            means.last().copied().unwrap_or_default(),
        ),
        count_spread: (
            counts.first().copied().unwrap_or_default(),
            pct(&counts, 0.5),
            counts.last().copied().unwrap_or_default(),
        ),
        jain: if squares > 0.0 {
            sum * sum / (counts.len() as f64 * squares)
        } else {
            0.0
        },
    })
}

/// One client of the crowd: a point select due every `period` from `first` until `end`.
async fn crowd_client(
    mut client: RawClient,
    i: usize,
    first: Instant,
    period: Duration,
    end: Instant,
) -> ClientLog {
    let mut log = ClientLog::default();
    let mut due = first;
    let mut k: u64 = 0;
    while due < end {
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        // Sent on time: latency counts from the send (not the timer's wake-up); sent
        // late because the last answer came after this one was due: from when it was
        // due.
        let from = if sent.duration_since(due) > Duration::from_millis(2) {
            due
        } else {
            sent
        };
        let aid = (i as u64 * 7919 + k * 104_729) % 100_000 + 1;
        let q = query_message(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        ));
        let r = async {
            client.send(&q).await?;
            client.drain_until_ready().await
        }
        .await;
        let done = Instant::now();
        match r {
            // Every request due inside the window counts, however late its answer.
            Ok((_, TransactionStatus::Idle)) => log
                .latencies
                .push(done.duration_since(from).as_micros().min(u32::MAX as u128) as u32),
            Ok((_, status)) => {
                log.errors += 1;
                log.first_error
                    .get_or_insert(format!("ended in transaction status {status:?}"));
            }
            Err(e) => {
                log.errors += 1;
                log.first_error.get_or_insert(format!("{e:#}"));
                break;
            }
        }
        k += 1;
        due += period;
    }
    log
}

/// One storm run's figures.
#[derive(Debug)]
struct StormResult {
    target: String,
    auth: &'static str,
    clients: usize,
    served: usize,
    errors: usize,
    all_served_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_login: Option<f64>,
    /// The proxy's peak resident set over the run, MiB.
    peak_rss_mib: Option<f64>,
}

impl Named for &StormResult {
    fn name(&self) -> &str {
        &self.target
    }
}

pub async fn storm(args: StormArgs) -> Result<()> {
    raise_nofile(args.clients)?;
    let cluster = tokio::task::block_in_place(|| Cluster::start(0))?;
    // A SCRAM verifier made by PostgreSQL; both proxies check logins against it, and
    // the server trusts them (loopback).
    let verifier = tokio::task::block_in_place(|| -> Result<String> {
        cluster.primary.psql(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'"
        ))?;
        cluster.primary.psql(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_USER}'"
        ))
    })?;
    if !verifier.starts_with("SCRAM-SHA-256$") {
        bail!("PostgreSQL made no SCRAM verifier: {verifier:?}");
    }
    let mut results = Vec::new();
    // Source addresses 127.100-250.x.1.
    let mut run_no: u8 = 99;
    for auth in &args.auth {
        let (mode, label) = match auth.as_str() {
            "scram" => (Auth::Scram(&verifier), "scram"),
            "trust" => (Auth::Trust, "trust"),
            other => bail!("--auth: unknown '{other}' (scram, trust)"),
        };
        for _ in 0..args.sides.rounds {
            for target in &args.sides.targets {
                run_no = if run_no >= 250 { 100 } else { run_no + 1 };
                let r = storm_once(&cluster, target, mode, label, &args, run_no).await?;
                println!(
                    "{:<10} {:<6} {} of {} served in {:.2} s (p50 {:.0} ms, p99 {:.0} ms); {} errors; {}; peak RSS {}",
                    r.target,
                    r.auth,
                    r.served,
                    r.clients,
                    r.all_served_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.errors,
                    r.cpu_us_per_login
                        .map_or("cpu ?".into(), |c| format!("{c:.0} µs proxy CPU per login")),
                    mib(r.peak_rss_mib),
                );
                results.push(r);
            }
        }
    }
    println!();
    println!("| target | auth | clients | served | errors | all served after | login p50 ms | login p99 ms | proxy CPU µs per login | proxy peak RSS |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} s | {:.0} | {:.0} | {} | {} |",
            r.target,
            r.auth,
            r.clients,
            r.served,
            r.errors,
            r.all_served_s,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_login.map_or("?".into(), |c| format!("{c:.0}")),
            mib(r.peak_rss_mib),
        );
    }
    for label in ["scram", "trust"] {
        let own: Vec<&StormResult> = results.iter().filter(|r| r.auth == label).collect();
        ratios(
            &own,
            |r| r.all_served_s,
            &format!("{label}: time until all served"),
        );
        ratios(
            &own,
            |r| r.cpu_us_per_login.unwrap_or(f64::NAN),
            &format!("{label}: CPU per login"),
        );
    }
    let errors: usize = results.iter().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} logins failed");
    }
    Ok(())
}

async fn storm_once(
    cluster: &Cluster,
    target: &str,
    auth: Auth<'_>,
    label: &'static str,
    args: &StormArgs,
    run_no: u8,
) -> Result<StormResult> {
    let (proxy, port) = start_target(
        cluster,
        target,
        args.clients,
        &args.sides,
        auth,
        "transaction",
    )
    .await?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut config = tokio_postgres::Config::new();
    config.dbname("postgres").connect_timeout(args.timeout);
    match auth {
        Auth::Scram(_) => config.user(SCRAM_USER).password(SCRAM_PASSWORD),
        Auth::Trust => config.user("postgres"),
    };
    // One client first, logged in as the storm's are and kept through it, so the
    // pool's server connection is there before the storm.
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (first, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    let _first_conn = tokio::spawn(conn);
    first.simple_query("SELECT 1").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu_before = cpu_time(proxy.pid());
    let started = Instant::now();
    // Each client reports its outcome, then stays connected until the last is served,
    // as a crowd after a failover would.
    let (release, released) = tokio::sync::watch::channel(false);
    let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(args.clients);
    for n in 0..args.clients {
        let config = config.clone();
        let mut released = released.clone();
        let report = report.clone();
        let from = source(run_no, n);
        let timeout = args.timeout;
        tasks.push(tokio::spawn(async move {
            let served = tokio::time::timeout(timeout, async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(from, 0))?;
                let stream = socket.connect(addr).await?;
                let (client, conn) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
                let conn = tokio::spawn(conn);
                client.simple_query("SELECT 1").await?;
                anyhow::Ok((client, conn))
            })
            .await;
            let (outcome, held) = match served {
                Ok(Ok(held)) => (Ok(started.elapsed()), Some(held)),
                Ok(Err(e)) => (Err(format!("{e:#}")), None),
                Err(_) => (Err(format!("not served within {timeout:?}")), None),
            };
            let _ = report.send(outcome);
            let _ = released.wait_for(|r| *r).await;
            drop(held);
        }));
    }
    drop(report);
    let mut took = Vec::with_capacity(args.clients);
    let mut errors = Vec::new();
    while let Some(outcome) = reports.recv().await {
        match outcome {
            Ok(t) => took.push(t),
            Err(e) => errors.push(e),
        }
        if took.len() + errors.len() == args.clients {
            break;
        }
    }
    let cpu_after = cpu_time(proxy.pid());
    let _ = release.send(true);
    for t in tasks {
        t.await?;
    }
    // The high-water mark: the storm's, however much was freed since.
    let peak_rss_mib = peak_rss_mib(proxy.pid());
    drop(proxy);
    if let Some(e) = errors.first() {
        eprintln!(
            "{target} ({label}): {} logins failed, the first: {e}",
            errors.len()
        );
    }
    took.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(StormResult {
        target: target.to_string(),
        auth: label,
        clients: args.clients,
        served: took.len(),
        errors: errors.len(),
        all_served_s: took.last().map_or(0.0, |d| d.as_secs_f64()),
        p50_ms: ms(pct(&took, 0.5)),
        p99_ms: ms(pct(&took, 0.99)),
        cpu_us_per_login: match (cpu_before, cpu_after) {
            (Some(b), Some(a)) if !took.is_empty() => {
                Some((a - b).as_secs_f64() * 1e6 / args.clients as f64)
            }
            _ => None,
        },
        peak_rss_mib,
    })
}

/// The loopback address the `n`th client of run `run` connects from: 10,000 clients
/// per address (one address has ~28,000 ports towards one server), and addresses of
/// its own for each run (the last run's closed connections keep their ports in
/// TIME_WAIT for a minute). The last octet changes with the second the bench started:
/// two invocations a few seconds apart would otherwise share run 0's addresses, and a
/// third one's logins found no free port.
pub fn source(run: u8, n: usize) -> std::net::IpAddr {
    static INVOCATION: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let last = *INVOCATION.get_or_init(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // 1..=250: a minute's worth of invocations (TIME_WAIT's length) apart.
        (secs % 250) as u8 + 1
    });
    std::net::Ipv4Addr::new(127, run, (n / 10_000) as u8, last).into()
}

/// Logs trust clients in through `target` at `addr` until `held` has `clients`,
/// `concurrency` at a time, from run `run`'s source addresses ([`source`]).
pub async fn log_in(
    held: &mut Vec<RawClient>,
    clients: usize,
    concurrency: usize,
    addr: std::net::SocketAddr,
    target: &str,
    run: u8,
    params: &[(String, String)],
) -> Result<()> {
    while held.len() < clients {
        let batch = (clients - held.len()).min(concurrency);
        let mut tasks = Vec::with_capacity(batch);
        for i in 0..batch {
            let from = source(run, held.len() + i);
            tasks.push(tokio::spawn(RawClient::login_trust_with(
                addr,
                from,
                "postgres",
                "postgres",
                params.to_vec(),
            )));
        }
        for t in tasks {
            held.push(
                t.await?
                    .with_context(|| format!("a login through {target}"))?,
            );
        }
    }
    Ok(())
}
