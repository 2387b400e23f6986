//! `handoff-bench patroni`: one switchover under load on a real two-member Patroni
//! cluster (Patroni from `HANDOFF_TEST_PATRONI` or `/opt/handoff-patroni`, on its own
//! etcd), each target on a fresh cluster:
//! - `handoff`: `POST /v1/shards/main/switchover {"to": "pg1"}` to the release handoff
//!   (which holds, then asks Patroni);
//! - `handoff-hook`: the same, with Patroni's `before_stop` running `handoff hold`
//!   against the proxy and `HANDOFF_PATRONI_HOOK=true` (the hold comes with the hook);
//! - `patronictl-hook`: `patronictl switchover`, the same hook;
//! - `pgbouncer`: PgBouncer paused around Patroni's switchover, the floor of a scripted
//!   procedure: `PAUSE`, `POST /switchover`, poll the candidate until it takes writes,
//!   repoint, `RELOAD`, `RESUME`;
//! - `direct`: clients with a libpq multi-host URL (`target_session_attrs=read-write`),
//!   `patronictl switchover`.
//!
//! Besides the load's figures it measures Patroni's own write gap in each run: a prober
//! writes (`SELECT txid_current()`) to each member directly every 10 ms, and the gap is
//! from the old leader's last accepted write to the new leader's first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handoff_tests::patroni::{Options, PatroniCluster};
use handoff_tests::pg::{free_port, PgBin};
use tokio::time::Instant;

use crate::compare::{start_pgbouncer_at, wait_listening, Kill, PgBouncerOpts};
use crate::run::events::Event;
use crate::run::workload::Workload;
use crate::run::{self, RunArgs, TargetResult};

/// Options of `handoff-bench patroni`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "handoff-bench patroni")]
pub struct Args {
    #[arg(long, value_enum, default_value = "tpcb")]
    pub workload: Workload,
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    #[arg(long, default_value = "14s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// When the switchover starts.
    #[arg(long, default_value = "5s", value_parser = run::events::parse_duration)]
    pub at: Duration,
    /// Which of handoff, handoff-hook, patronictl-hook, pgbouncer, direct to run (comma
    /// separated).
    #[arg(
        long,
        default_value = "handoff,handoff-hook,patronictl-hook,pgbouncer,direct"
    )]
    pub targets: String,
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

const TARGETS: [&str; 5] = [
    "handoff",
    "handoff-hook",
    "patronictl-hook",
    "pgbouncer",
    "direct",
];

/// One target's run and the HA manager's write gap during it.
pub(crate) struct Measured {
    pub(crate) result: TargetResult,
    pub(crate) gap: Option<Duration>,
}

pub async fn run(args: Args) -> Result<()> {
    let wanted = targets(&args.targets, &TARGETS)?;
    let mut measured = Vec::new();
    for name in &wanted {
        measured.push(one(&args, name).await?);
    }
    report(&measured, "Patroni's own write gap in that run (old leader's last write to the new leader's first, measured directly)");
    Ok(())
}

/// `--targets`, each checked against `known`.
pub(crate) fn targets(list: &str, known: &[&str]) -> Result<Vec<String>> {
    let wanted: Vec<String> = list.split(',').map(|t| t.trim().to_string()).collect();
    if let Some(w) = wanted.iter().find(|w| !known.contains(&w.as_str())) {
        bail!("--targets: unknown target '{w}' ({})", known.join(", "));
    }
    Ok(wanted)
}

/// The table of targets with the manager's gap, their errors, and handoff's reports.
pub(crate) fn report(measured: &[Measured], gap: &str) {
    println!();
    println!(
        "{:<17} {:>7} {:>7} {:>9} {:>9} {:>9} {:>14} {:>6}  event",
        "target", "tps", "errors", "p99.9 ms", "max ms", "gap ms", "max - gap ms", "lost"
    );
    for m in measured {
        let r = &m.result;
        let gap = m.gap.map(|g| g.as_secs_f64() * 1000.0);
        let ev = r.events.first();
        println!(
            "{:<17} {:>7.0} {:>7} {:>9.1} {:>9.0} {:>9} {:>14} {:>6}  {}",
            r.name,
            r.summary.tps,
            r.summary.errors,
            r.summary.p999,
            r.summary.max,
            gap.map_or("?".into(), |g| format!("{g:.0}")),
            gap.map_or("?".into(), |g| format!("{:+.0}", r.summary.max - g)),
            r.lost_writes.len(),
            ev.map_or(String::new(), |e| e.span()),
        );
    }
    for m in measured {
        for (k, n) in &m.result.errors {
            println!("  {}: {n} × {k}", m.result.name);
        }
        if m.result.name.starts_with("handoff") {
            if let Some(e) = m.result.events.first() {
                println!(
                    "\n{}'s switchover report:\n{}",
                    m.result.name,
                    e.output.trim()
                );
            }
        }
    }
    println!("\ngap: {gap}");
}

/// The release handoff in front of a Patroni cluster.
fn start_handoff(
    c: &PatroniCluster,
    port: u16,
    admin: u16,
    pool: usize,
    hook: bool,
) -> Result<Kill> {
    let bin = std::env::current_exe()?.with_file_name("handoff");
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p handoff -p handoff-bench",
            bin.display()
        );
    }
    let child = crate::compare::handoff_command(&bin)
        .env("HANDOFF_SHARDS", "main")
        .env("HANDOFF_PATRONI", format!("main={}", c.endpoints()))
        .env("HANDOFF_LISTEN", format!("127.0.0.1:{port}"))
        .env("HANDOFF_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("HANDOFF_POOL_SIZE", pool.to_string())
        .env("HANDOFF_MAX_CLIENT_CONN", "5000")
        .env("HANDOFF_LOG", "warn")
        .env("HANDOFF_PATRONI_HOOK", hook.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting handoff")?;
    Ok(Kill::new(child))
}

async fn one(args: &Args, name: &str) -> Result<Measured> {
    let port = free_port()?;
    let admin = free_port()?;
    let bin = PgBin::find()?;
    // The hook runs as the server user: its own copy of the binary (its directory also
    // holds PgBouncer's files).
    let release = std::env::current_exe()?.with_file_name("handoff");
    let (hook_dir, copy) = handoff_tests::patroni::server_user_copy(&release)
        .context("copying the release handoff binary for the hook")?;
    let hook = name.ends_with("-hook");
    let opts = Options {
        before_stop: hook.then(|| {
            format!(
                "{} hold --admin 127.0.0.1:{admin} --shard main --primary {{addr}} --timeout 10s",
                copy.display()
            )
        }),
    };
    let cluster = tokio::task::block_in_place(|| PatroniCluster::start(2, opts))?;
    let (old, new) = (&cluster.members[0], &cluster.members[1]);
    let ctl = format!(
        "{}{} -c {} switchover --leader pg0 --candidate pg1 --force",
        crate::compare::as_server_user(),
        handoff_tests::patroni::patroni_bin()?
            .with_file_name("patronictl")
            .display(),
        cluster.config_path(0).display()
    );
    let mut keep = Vec::new();
    let (url, command) = match name {
        "handoff" | "handoff-hook" | "patronictl-hook" => {
            keep.push(start_handoff(&cluster, port, admin, args.pool_size, hook)?);
            wait_listening(port, "handoff").await?;
            let command = if name.starts_with("handoff") {
                format!(
                    "POST http://127.0.0.1:{admin}/v1/shards/main/switchover {{\"to\": \"pg1\"}}"
                )
            } else {
                ctl
            };
            (
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                command,
            )
        }
        "pgbouncer" => {
            let Some(pgb) = crate::compare::pgbouncer_binary() else {
                bail!("pgbouncer is not installed (apt-get install pgbouncer)");
            };
            let dir = hook_dir.path();
            bin.give_to_server_user(dir)?;
            keep.push(start_pgbouncer_at(
                &bin,
                dir,
                old.pg_port,
                &pgb,
                port,
                PgBouncerOpts {
                    pool_size: args.pool_size,
                    admin: true,
                    max_clients: 2000,
                    scram: None,
                },
            )?);
            wait_listening(port, "pgbouncer").await?;
            let psql = bin.bin("psql");
            let console = format!(
                "{} -X -q -h 127.0.0.1 -p {port} -U postgres pgbouncer -c",
                psql.display()
            );
            let ini = dir.join("pgbouncer.ini");
            let command = format!(
                "set -e; {console} PAUSE; \
                 curl -s -o /dev/null -X POST http://127.0.0.1:{api}/switchover -d '{{\"leader\":\"pg0\",\"candidate\":\"pg1\"}}' & \
                 until {psql} -X -h 127.0.0.1 -p {newp} -U postgres -Atqc 'select not pg_is_in_recovery() and txid_current() > 0' postgres 2>/dev/null | grep -q t; do sleep 0.02; done; \
                 sed -i 's/port={oldp}/port={newp}/' {ini}; {console} RELOAD; {console} RESUME; wait",
                api = old.api_port,
                psql = psql.display(),
                newp = new.pg_port,
                oldp = old.pg_port,
                ini = ini.display(),
            );
            (
                format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                command,
            )
        }
        _ => (
            format!(
                "postgres://postgres@{},{}/postgres?target_session_attrs=read-write",
                old.addr(),
                new.addr()
            ),
            ctl,
        ),
    };
    let prober = Prober::start(&[old.pg_port, new.pg_port]);
    let load = Load {
        workload: args.workload,
        clients: args.clients,
        duration: args.duration,
        at: args.at,
        out: &args.out,
        quiet: args.quiet,
    };
    let measured = measure(&load, name, url, command, prober).await;
    drop(keep);
    drop(cluster);
    measured
}

/// The load and pool options the two-node managers' benches share
/// (`pg-auto-failover`, `repmgr`); each adds its own `--targets`.
#[derive(Debug, Clone, clap::Args)]
pub struct TwoNodeLoad {
    #[arg(long, value_enum, default_value = "tpcb")]
    pub workload: Workload,
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    #[arg(long, default_value = "16s", value_parser = run::events::parse_duration)]
    pub duration: Duration,
    /// When the switchover starts.
    #[arg(long, default_value = "5s", value_parser = run::events::parse_duration)]
    pub at: Duration,
    #[arg(long, default_value_t = 20)]
    pub pool_size: usize,
    #[arg(long, default_value = "handoff-bench-results")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// A two-node cluster's old and new primary: address (`host:port`), port, and the old
/// one's connection string (for the manager's own write gap).
pub(crate) struct TwoNodes {
    pub(crate) old: (String, u16),
    pub(crate) new: (String, u16),
    pub(crate) old_conn: String,
}

/// The targets every two-node manager's bench shares, after its own (handoff and its
/// variants): `pgbouncer`, paused around the manager's switchover `ctl`, and `direct`
/// (multi-host clients), then the measurement. `own`: the URL and the command of the
/// bench's own target, with what must stay alive while it runs.
pub(crate) async fn measure_two_nodes(
    load: &TwoNodeLoad,
    name: &str,
    (bin, dir): (&PgBin, &std::path::Path),
    nodes: TwoNodes,
    port: u16,
    ctl: String,
    own: Option<(Kill, String)>,
) -> Result<Measured> {
    let mut keep = Vec::new();
    let through_port = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let (url, command) = match (name, own) {
        (_, Some((kill, command))) => {
            keep.push(kill);
            (through_port, command)
        }
        ("pgbouncer", None) => {
            let (kill, command) = pgbouncer_paused(
                bin,
                dir,
                (nodes.old.1, nodes.new.1, port),
                load.pool_size,
                &ctl,
            )
            .await?;
            keep.push(kill);
            (through_port, command)
        }
        (_, None) => (
            format!(
                "postgres://postgres@{},{}/postgres?target_session_attrs=read-write",
                nodes.old.0, nodes.new.0
            ),
            ctl,
        ),
    };
    let prober = Prober::inserting(&nodes.old_conn, &[nodes.old.1, nodes.new.1]).await?;
    let load = Load {
        workload: load.workload,
        clients: load.clients,
        duration: load.duration,
        at: load.at,
        out: &load.out,
        quiet: load.quiet,
    };
    let measured = measure(&load, name, url, command, prober).await;
    drop(keep);
    measured
}

/// The load of one switchover run.
pub(crate) struct Load<'a> {
    pub(crate) workload: Workload,
    pub(crate) clients: usize,
    pub(crate) duration: Duration,
    /// When `command` (the switchover) runs.
    pub(crate) at: Duration,
    pub(crate) out: &'a std::path::Path,
    pub(crate) quiet: bool,
}

/// Runs `load` against `url` with `command` at `load.at`, and the manager's own write
/// gap `prober` saw meanwhile.
pub(crate) async fn measure(
    load: &Load<'_>,
    name: &str,
    url: String,
    command: String,
    prober: Prober,
) -> Result<Measured> {
    let run_args = RunArgs {
        targets: vec![(name.to_string(), url)],
        workload: load.workload,
        clients: load.clients,
        duration: load.duration,
        rate: None,
        events: Vec::new(),
        accounts: 100_000,
        out: load.out.to_path_buf(),
        quiet: load.quiet,
        target_events: vec![(
            name.to_string(),
            Event {
                at: load.at,
                command,
            },
        )],
        bypass: Vec::new(),
        cpu_of: Vec::new(),
        meta: Vec::new(),
    };
    let mut results = run::run(run_args).await?;
    let gap = prober.stop().await;
    let result = results.pop().context("the run produced no result")?;
    Ok(Measured { result, gap })
}

/// PgBouncer in front of `old_port`, and the scripted switchover around it: `PAUSE`,
/// `switch` in the background, a write tried on `new_port` every 20 ms until one
/// succeeds (leaving recovery is not always taking writes), repoint, `RELOAD`, `RESUME`.
pub(crate) async fn pgbouncer_paused(
    bin: &PgBin,
    dir: &std::path::Path,
    (old_port, new_port, port): (u16, u16, u16),
    pool_size: usize,
    switch: &str,
) -> Result<(Kill, String)> {
    let Some(pgb) = crate::compare::pgbouncer_binary() else {
        bail!("pgbouncer is not installed (apt-get install pgbouncer)");
    };
    bin.give_to_server_user(dir)?;
    let kill = start_pgbouncer_at(
        bin,
        dir,
        old_port,
        &pgb,
        port,
        PgBouncerOpts {
            pool_size,
            admin: true,
            max_clients: 2000,
            scram: None,
        },
    )?;
    wait_listening(port, "pgbouncer").await?;
    let psql = bin.bin("psql");
    let console = format!(
        "{} -X -q -h 127.0.0.1 -p {port} -U postgres pgbouncer -c",
        psql.display()
    );
    let command = format!(
        "set -e; {console} PAUSE; {switch} & \
         until {psql} -X -q -h 127.0.0.1 -p {new_port} -U postgres -c 'CREATE TEMP TABLE handoff_w (x int)' postgres >/dev/null 2>&1; do sleep 0.02; done; \
         sed -i 's/port={old_port}/port={new_port}/' {ini}; {console} RELOAD; {console} RESUME; wait",
        psql = psql.display(),
        ini = dir.join("pgbouncer.ini").display(),
    );
    Ok((kill, command))
}

/// Direct writes to each member every 10 ms, their successes timed.
pub(crate) struct Prober {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ok: Vec<Arc<Mutex<Vec<Instant>>>>,
}

impl Prober {
    pub(crate) fn start(ports: &[u16]) -> Self {
        Self::start_writing(ports, "SELECT txid_current()")
    }

    /// `INSERT`s on each node every 10 ms (into a table made on the primary, at
    /// `primary_conn`): a write a promoted but still read-only server refuses.
    pub(crate) async fn inserting(primary_conn: &str, ports: &[u16]) -> Result<Self> {
        let (c, conn) = tokio_postgres::connect(primary_conn, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE IF NOT EXISTS handoff_gap (at timestamptz)")
            .await?;
        Ok(Self::start_writing(
            ports,
            "INSERT INTO handoff_gap VALUES (now())",
        ))
    }

    /// Runs `sql` (a write) on each member every 10 ms, its successes timed.
    pub(crate) fn start_writing(ports: &[u16], sql: &'static str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut ok = Vec::new();
        for &port in ports {
            let seen = Arc::new(Mutex::new(Vec::new()));
            ok.push(Arc::clone(&seen));
            let stop = Arc::clone(&stop);
            tasks.push(tokio::spawn(async move {
                let url = format!(
                    "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=1"
                );
                let mut client: Option<tokio_postgres::Client> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        client = match tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio_postgres::connect(&url, tokio_postgres::NoTls),
                        )
                        .await
                        {
                            Ok(Ok((c, conn))) => {
                                tokio::spawn(conn);
                                Some(c)
                            }
                            _ => None,
                        };
                    }
                    if let Some(c) = &client {
                        if c.simple_query(sql).await.is_ok() {
                            seen.lock().expect("not poisoned").push(Instant::now());
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Self { stop, tasks, ok }
    }

    /// From the first member's last write to the second member's first.
    pub(crate) async fn stop(self) -> Option<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        let old = self.ok[0].lock().ok()?.last().copied()?;
        let new = self.ok[1].lock().ok()?.first().copied()?;
        new.checked_duration_since(old)
    }
}
