//! `handoff-bench idle`: resident memory of a proxy holding many idle client
//! connections (each logged in, then silent), handoff and PgBouncer side by side in one
//! run against the same PostgreSQL server.
//!
//! Clients log in `concurrency` at a time (a reconnect storm after a deploy). For each
//! proxy the run reports the time the storm took, the resident set right after it, and
//! again after a quiet spell with every client still connected (what an allocator gives
//! back once the burst is over).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff_tests::raw::RawClient;
use handoff_tests::Cluster;

use crate::compare::{pgbouncer_binary, Kill};

/// Options of `handoff-bench idle`.
#[derive(Debug, Clone)]
pub struct IdleArgs {
    pub clients: usize,
    /// Logins in flight at once.
    pub concurrency: usize,
    pub pool_mode: String,
    /// `handoff`, `pgbouncer`.
    pub targets: Vec<String>,
    /// How long the clients stay idle before the second reading.
    pub settle: Duration,
    /// Startup parameters each client sends besides its user and database (none by
    /// default; `--params jdbc` sends what pgJDBC sends).
    pub params: Vec<(String, String)>,
}

/// What pgJDBC 42 puts in its StartupMessage besides the user and database.
const JDBC_PARAMS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "2"),
    ("application_name", "PostgreSQL JDBC Driver"),
];

/// `--params`: `jdbc`, or `name=value` pairs separated by commas.
pub fn startup_params(v: &str) -> Result<Vec<(String, String)>, String> {
    if v == "jdbc" {
        return Ok(JDBC_PARAMS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect());
    }
    v.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("--params: '{pair}' is not name=value")),
        })
        .collect()
}

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    crate::run::status_kib(pid, "VmRSS").context("no VmRSS")
}

/// One proxy's figures.
#[derive(Debug)]
struct Memory {
    target: String,
    clients: usize,
    base_kib: u64,
    storm_secs: f64,
    after_kib: u64,
    settled_kib: u64,
}

impl Memory {
    fn per_client(&self, kib: u64) -> f64 {
        kib.saturating_sub(self.base_kib) as f64 * 1024.0 / self.clients as f64
    }
}

pub async fn run(args: IdleArgs) -> Result<()> {
    // One target at a time: its clients are gone before the next one starts.
    let need = args.clients + 200;
    if rlimit::getrlimit(rlimit::Resource::NOFILE)?.1 < need as u64 {
        // Root may raise the hard limit; the proxies started below inherit it.
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, need as u64, need as u64);
    }
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    if (limit as usize) < need {
        bail!(
            "the open-file limit is {limit}; {} clients need more (raise the hard limit)",
            args.clients
        );
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(0))?;
    let mut results = Vec::new();
    // handoff's pool size is its default, PgBouncer's the same 20.
    let sides = crate::crowd::Sides {
        pool_size: 20,
        rounds: 1,
        targets: Vec::new(),
        baseline: None,
    };
    for target in &args.targets {
        if target == "pgbouncer" && pgbouncer_binary().is_none() {
            eprintln!(
                "pgbouncer is not installed: measuring handoff only (apt-get install pgbouncer)"
            );
            continue;
        }
        if target != "handoff" && target != "pgbouncer" {
            bail!("unknown target '{target}' (handoff, pgbouncer)");
        }
        let (proxy, port) = crate::crowd::start_target(
            &cluster,
            target,
            args.clients,
            &sides,
            crate::crowd::Auth::Trust,
            &args.pool_mode,
        )
        .await?;
        let m = measure(target, proxy, port, &args, 1 + results.len() as u8).await?;
        println!(
            "{:<10} {} clients in {:.1} s; RSS {:.1} MiB after the storm ({:.0} B per client), {:.1} MiB after {:?} idle ({:.0} B per client)",
            m.target,
            m.clients,
            m.storm_secs,
            m.after_kib as f64 / 1024.0,
            m.per_client(m.after_kib),
            m.settled_kib as f64 / 1024.0,
            args.settle,
            m.per_client(m.settled_kib),
        );
        results.push(m);
    }
    println!();
    if !args.params.is_empty() {
        let names: Vec<&str> = args.params.iter().map(|(k, _)| k.as_str()).collect();
        println!("each client sent {}", names.join(", "));
    }
    println!("| target | clients | logins at once | baseline | storm took | RSS after the storm | per client | RSS after {:?} idle | per client |", args.settle);
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &results {
        println!(
            "| {} | {} | {} | {:.1} MiB | {:.1} s | {:.1} MiB | {:.0} B | {:.1} MiB | {:.0} B |",
            m.target,
            m.clients,
            args.concurrency,
            m.base_kib as f64 / 1024.0,
            m.storm_secs,
            m.after_kib as f64 / 1024.0,
            m.per_client(m.after_kib),
            m.settled_kib as f64 / 1024.0,
            m.per_client(m.settled_kib),
        );
    }
    if let (Some(h), Some(p)) = (
        results.iter().find(|m| m.target == "handoff"),
        results.iter().find(|m| m.target == "pgbouncer"),
    ) {
        println!(
            "\nhandoff / PgBouncer, growth per idle client after the quiet spell: {:.2}",
            h.per_client(h.settled_kib) / p.per_client(p.settled_kib).max(1.0)
        );
    }
    Ok(())
}

/// `source_net`: the run's source addresses ([`source`]).
async fn measure(
    target: &str,
    proxy: Kill,
    port: u16,
    args: &IdleArgs,
    source_net: u8,
) -> Result<Memory> {
    let pid = proxy.pid();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // One client first, so the pool and its server connection exist in the baseline.
    let first = RawClient::login_trust(addr, "postgres", "postgres").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base_kib = rss_kib(pid)?;
    let started = Instant::now();
    let mut held = vec![first];
    crate::crowd::log_in(
        &mut held,
        args.clients,
        args.concurrency,
        addr,
        target,
        source_net,
        &args.params,
    )
    .await?;
    let storm_secs = started.elapsed().as_secs_f64();
    let after_kib = rss_kib(pid)?;
    tokio::time::sleep(args.settle).await;
    let settled_kib = rss_kib(pid)?;
    drop(held);
    drop(proxy);
    Ok(Memory {
        target: target.to_string(),
        clients: args.clients,
        base_kib,
        storm_secs,
        after_kib,
        settled_kib,
    })
}
