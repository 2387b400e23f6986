//! `handoff-bench switchover`: one planned switchover under load, three ways, each on
//! its own fresh primary + standby:
//! - `handoff`: `POST /v1/shards/main/switchover` to the release `handoff` binary;
//! - `pgbouncer`: the manual procedure (PAUSE, stop, promote, RELOAD, RESUME);
//! - `direct`: clients with a multi-host connection string
//!   (`target_session_attrs=read-write`), the primary stopped and the standby promoted.
//!
//! Prints errors, the longest stall, p99.9 and max latency, and the time to get back to
//! 90% of the throughput before the switchover; writes one JSON and one plot.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use handoff_tests::pg::free_port;
use handoff_tests::Cluster;

use crate::compare::{pgbouncer_for_switchover, start_handoff, wait_listening};
use crate::run::events::Event;
use crate::run::workload::Workload;
use crate::run::{self, RunArgs, TargetResult};

/// Options of `handoff-bench switchover`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench switchover")]
pub struct Args {
    #[arg(long, value_enum, default_value = "tpcb")]
    pub workload: Workload,
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    #[arg(long, default_value = "12s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// When the switchover starts.
    #[arg(long, default_value = "4s", value_parser = run::events::parse_duration)]
    pub at: Duration,
    /// Which of handoff, pgbouncer, direct to run (comma separated).
    #[arg(long, default_value = "handoff,pgbouncer,direct")]
    pub targets: String,
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// The prefix that runs a server command as the `postgres` user when we are root (the
/// harness's clusters belong to it).
pub fn as_server_user() -> &'static str {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(1)
        == 0;
    if root {
        "runuser -u postgres -- "
    } else {
        ""
    }
}

/// Seconds from the event's start until a 0.5 s window reaches 90% of the throughput
/// of the 2 s before it. `None` if it never does within the run.
pub fn recovery(r: &TargetResult) -> Option<f64> {
    let e = r.events.first()?;
    let tl = &r.summary.timeline;
    let bucket = tl.get(1).map(|p| p.t - tl[0].t).unwrap_or(0.1).max(1e-3);
    let per_s = |from: f64, to: f64| -> f64 {
        let n: u64 = tl
            .iter()
            .filter(|p| p.t >= from && p.t < to)
            .map(|p| p.txns)
            .sum();
        n as f64 / (to - from)
    };
    let before = per_s((e.started - 2.0).max(0.0), e.started);
    if before <= 0.0 {
        return None;
    }
    let last = tl.last()?.t;
    let mut t = e.started;
    while t + 0.5 <= last + bucket {
        if per_s(t, t + 0.5) >= 0.9 * before {
            return Some(t - e.started);
        }
        t += bucket;
    }
    None
}

pub async fn run(args: Args) -> Result<()> {
    let wanted: Vec<&str> = args.targets.split(',').map(str::trim).collect();
    for w in &wanted {
        if !["handoff", "pgbouncer", "direct"].contains(w) {
            bail!("--targets: unknown target '{w}' (handoff, pgbouncer, direct)");
        }
    }
    let mut clusters = Vec::new();
    let mut keep = Vec::new();
    let mut targets = Vec::new();
    let mut events = Vec::new();
    let pg_ctl = |c: &Cluster| c.bin.bin("pg_ctl").display().to_string();
    for name in &wanted {
        let cluster = tokio::task::block_in_place(|| Cluster::start(1))?;
        let port = free_port()?;
        match *name {
            "handoff" => {
                let admin = free_port()?;
                keep.push(start_handoff(&cluster, port, admin, args.pool_size)?);
                wait_listening(port, "handoff").await?;
                targets.push((
                    "handoff".to_string(),
                    format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                ));
                let body = format!("{{\"to\": \"{}\"}}", cluster.standbys[0].addr());
                events.push((
                    "handoff".to_string(),
                    Event {
                        at: args.at,
                        command: format!(
                            "POST http://127.0.0.1:{admin}/v1/shards/main/switchover {body}"
                        ),
                    },
                ));
            }
            "pgbouncer" => {
                let (pgb, script) = pgbouncer_for_switchover(&cluster, port).await?;
                keep.push(pgb);
                targets.push((
                    "pgbouncer".to_string(),
                    format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                ));
                events.push((
                    "pgbouncer".to_string(),
                    Event {
                        at: args.at,
                        command: script,
                    },
                ));
            }
            _ => {
                targets.push((
                    "direct".to_string(),
                    format!(
                        "postgres://postgres@{},{}/postgres?target_session_attrs=read-write",
                        cluster.primary.addr(),
                        cluster.standbys[0].addr()
                    ),
                ));
                let as_pg = as_server_user();
                events.push((
                    "direct".to_string(),
                    Event {
                        at: args.at,
                        command: format!(
                            "set -e; {as_pg}{ctl} -D {p} -m fast -w stop; {as_pg}{ctl} -D {s} -w promote",
                            ctl = pg_ctl(&cluster),
                            p = cluster.primary.data.display(),
                            s = cluster.standbys[0].data.display(),
                        ),
                    },
                ));
            }
        }
        clusters.push(cluster);
    }
    let run_args = RunArgs {
        targets,
        workload: args.workload,
        clients: args.clients,
        duration: args.duration,
        rate: None,
        events: Vec::new(),
        accounts: 100_000,
        out: args.out,
        quiet: args.quiet,
        target_events: events,
    };
    let results = run::run(run_args).await?;
    println!();
    println!(
        "{:<10} {:>8} {:>7} {:>10} {:>9} {:>9} {:>11} {:>9}  switchover",
        "target", "tps", "errors", "stall ms", "p99.9 ms", "max ms", "recover s", "lost"
    );
    for r in &results {
        let ev = r.events.first();
        println!(
            "{:<10} {:>8.0} {:>7} {:>10.0} {:>9.1} {:>9.0} {:>11} {:>9}  {}",
            r.name,
            r.summary.tps,
            r.summary.errors,
            r.summary.stall_ms,
            r.summary.p999,
            r.summary.max,
            recovery(r).map_or("never".to_string(), |s| format!("{s:.2}")),
            r.lost_writes.len(),
            ev.map_or(String::new(), |e| format!(
                "{:.2}s..{:.2}s ({:.0} ms, exit {:?})",
                e.started,
                e.ended,
                (e.ended - e.started) * 1000.0,
                e.exit_code
            )),
        );
    }
    for r in &results {
        if r.name == "handoff" {
            if let Some(e) = r.events.first() {
                println!("\nhandoff's switchover report:\n{}", e.output.trim());
            }
        }
        for (k, n) in &r.errors {
            println!("  {}: {n} × {k}", r.name);
        }
    }
    drop(keep);
    drop(clusters);
    Ok(())
}
