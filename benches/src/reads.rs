//! `handoff-bench reads`: reads on standbys. One command starts a primary with two
//! streaming standbys and handoff (the release binary, as its own process), then
//!
//! 1. runs the same point-read workload direct to one standby (`direct`, the baseline
//!    of the ratios), direct to the primary (`primary`), through PgBouncer in front of
//!    one standby (`pgbouncer`, when installed: PgBouncer 1.18 balances nothing), and
//!    through handoff's `postgres@replica` over both standbys (`handoff`), and through
//!    handoff to the primary (`handoff-primary`, its primary path for reference), one
//!    after the other, and prints one table (throughput, p50/p99, proxy CPU per
//!    transaction);
//! 2. runs writers (tpcb, through `postgres`) and readers (through `postgres@replica`)
//!    at the same time through a planned switchover to one of the standbys, and prints
//!    each side's errors, longest wait for an answer and longest stall.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use handoff_tests::pg::free_port;
use handoff_tests::Cluster;

use crate::compare::{
    pgbouncer_binary, ratio_table, start_handoff_with, start_pgbouncer_at, wait_listening,
    PgBouncerOpts,
};
use crate::run::{self, events::Event, workload, workload::Workload, RunArgs, TargetResult};

/// Options of `handoff-bench reads`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench reads")]
pub struct Args {
    /// Concurrent clients of the read comparison (the switchover run splits them
    /// between writers and readers).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    #[arg(long, default_value = "10s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// Server connections per pool (handoff's primary and read pools, PgBouncer's).
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    #[arg(long, default_value_t = 100_000)]
    pub accounts: i32,
    /// How long the read/write switchover run lasts, and when the switchover starts.
    #[arg(long, default_value = "12s", value_parser = run::events::parse_duration)]
    pub switchover_duration: Duration,
    #[arg(long, default_value = "4s", value_parser = run::events::parse_duration)]
    pub at: Duration,
    /// Leave out the read/write switchover run.
    #[arg(long)]
    pub no_switchover: bool,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

fn url(addr: &str, db: &str) -> String {
    format!("postgres://postgres@{addr}/{db}")
}

/// Waits until `n` standbys are in handoff's read rotation.
async fn rotation(admin: SocketAddr, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = handoff_tests::raw::http(admin, "GET", "/v1/shards", None).await {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let inside = v["shards"][0]["standbys"]
                .as_array()
                .map(|l| l.iter().filter(|s| s["in_rotation"] == true).count())
                .unwrap_or(0);
            if inside >= n {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("handoff did not put {n} standbys in its read rotation within 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a standby has replayed the workload's tables.
async fn replayed(addr: &str, accounts: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(c) = run::connect(&url(addr, "postgres")).await {
            if workload::ready(&c, accounts).await {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("standby {addr} did not replay the workload's tables within 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn args_for(
    targets: Vec<(String, String)>,
    workload: Workload,
    clients: usize,
    duration: Duration,
    a: &Args,
    out: PathBuf,
) -> RunArgs {
    RunArgs {
        targets,
        workload,
        clients,
        duration,
        rate: None,
        events: Vec::new(),
        accounts: a.accounts,
        out,
        quiet: a.quiet,
        target_events: Vec::new(),
        bypass: Vec::new(),
        cpu_of: Vec::new(),
        meta: Vec::new(),
    }
}

pub async fn run(a: Args) -> Result<()> {
    if a.clients < 2 {
        bail!("--clients must be at least 2");
    }
    let cluster = tokio::task::block_in_place(|| Cluster::start(2))?;
    let primary = cluster.primary.addr();
    let standby = cluster.standbys[0].addr();
    {
        let c = run::connect(&url(&primary, "postgres"))
            .await
            .context("connecting to the primary")?;
        workload::setup(&c, a.accounts).await?;
    }
    for s in &cluster.standbys {
        replayed(&s.addr(), a.accounts).await?;
    }
    let port = free_port()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let handoff = start_handoff_with(
        &cluster,
        port,
        admin.port(),
        a.pool_size,
        &[("HANDOFF_REPLICA_POOL_SIZE", a.pool_size.to_string())],
    )?;
    wait_listening(port, "handoff").await?;
    rotation(admin, 2).await?;

    let mut targets = vec![
        ("direct".to_string(), url(&standby, "postgres")),
        ("primary".to_string(), url(&primary, "postgres")),
    ];
    let mut cpu_of = Vec::new();
    let _pgbouncer = match pgbouncer_binary() {
        Some(bin) => {
            let pgb_port = free_port()?;
            let child = start_pgbouncer_at(
                &cluster.bin,
                cluster.dir(),
                cluster.standbys[0].port,
                &bin,
                pgb_port,
                PgBouncerOpts {
                    pool_size: a.pool_size,
                    admin: false,
                    max_clients: 2000,
                    scram: None,
                },
            )?;
            wait_listening(pgb_port, "pgbouncer").await?;
            cpu_of.push(("pgbouncer".to_string(), child.pid()));
            targets.push((
                "pgbouncer".into(),
                url(&format!("127.0.0.1:{pgb_port}"), "postgres"),
            ));
            Some(child)
        }
        None => None,
    };
    cpu_of.push(("handoff".to_string(), handoff.pid()));
    cpu_of.push(("handoff-primary".to_string(), handoff.pid()));
    let replica = url(&format!("127.0.0.1:{port}"), "postgres%40replica");
    targets.push(("handoff".into(), replica.clone()));
    // The same reads through handoff to the primary: its own path, for reference.
    targets.push((
        "handoff-primary".into(),
        url(&format!("127.0.0.1:{port}"), "postgres"),
    ));
    let mut compare = args_for(
        targets,
        Workload::Select,
        a.clients,
        a.duration,
        &a,
        a.out.join("reads"),
    );
    compare.cpu_of = cpu_of;
    compare.meta = vec![(
        "setting".into(),
        "handoff: postgres@replica over two standbys; direct and pgbouncer: one standby".into(),
    )];
    let results = run::run(compare).await?;
    println!();
    println!(
        "reads ({} clients, {:?}): direct = one standby; handoff = @replica over two",
        a.clients, a.duration
    );
    print!("{}", ratio_table(&results));

    if a.no_switchover {
        return Ok(());
    }
    let half = a.clients / 2;
    let mut writes = args_for(
        vec![(
            "writes".into(),
            url(&format!("127.0.0.1:{port}"), "postgres"),
        )],
        Workload::Tpcb,
        half,
        a.switchover_duration,
        &a,
        a.out.join("reads-switchover-writes"),
    );
    writes.events = vec![Event {
        at: a.at,
        command: format!("POST http://{admin}/v1/shards/main/switchover {{\"to\": \"{standby}\"}}"),
    }];
    let reads = args_for(
        vec![("reads".into(), replica)],
        Workload::Select,
        a.clients - half,
        a.switchover_duration,
        &a,
        a.out.join("reads-switchover-reads"),
    );
    let (w, r) = tokio::join!(run::run(writes), run::run(reads));
    let (w, r) = (w?, r?);
    println!();
    println!(
        "reads and writes through a switchover to {standby} at {:?} ({half} writers, {} readers):",
        a.at,
        a.clients - half
    );
    for (label, res) in [("writes", &w), ("reads", &r)] {
        for t in res {
            print_side(label, t);
        }
    }
    for t in &w {
        for e in &t.events {
            println!("  switchover {}: {}", e.span(), e.output.trim());
        }
    }
    Ok(())
}

fn print_side(label: &str, t: &TargetResult) {
    let m = &t.summary;
    let errors: Vec<String> = t.errors.iter().map(|(e, n)| format!("{n}× {e}")).collect();
    println!(
        "  {label:<6} {:>8} txns {:>9.1} tps  errors {:<3} longest {:>8.1} ms  stall {:>8.1} ms{}{}",
        m.txns,
        m.tps,
        m.errors,
        m.max,
        m.stall_ms,
        if t.lost_writes.is_empty() {
            String::new()
        } else {
            format!("  LOST {} acknowledged writes", t.lost_writes.len())
        },
        if errors.is_empty() {
            String::new()
        } else {
            format!("  ({})", errors.join("; "))
        }
    );
}
