//! `handoff-bench switchover`: one planned switchover under load, three ways, each on
//! its own fresh primary + standby:
//! - `handoff`: `POST /v1/shards/main/switchover` to the release `handoff` binary;
//! - `pgbouncer`: the manual procedure (PAUSE, stop, promote, RELOAD, RESUME);
//! - `direct`: clients with a multi-host connection string
//!   (`target_session_attrs=read-write`), the primary stopped and the standby promoted.
//!
//! With `--crash` (`handoff-bench failover`) the event is an unplanned failover instead:
//! the primary's processes are killed with `kill -9`, and the standby is promoted
//! `--promote-after` later, as an HA system would. handoff finds the new primary itself;
//! PgBouncer is pointed at it (RELOAD) right after the promotion; direct clients
//! reconnect through their multi-host connection string. The primary replicates
//! synchronously, so an acknowledged write must survive.
//!
//! Prints errors, the longest stall, p99.9 and max latency, and the time to get back to
//! 90% of the throughput before the switchover; writes one JSON and one plot.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use handoff_tests::pg::free_port;
use handoff_tests::Cluster;

use crate::compare::{as_server_user, pgbouncer_for_switchover, wait_listening};
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
    /// An unplanned failover (kill -9 of the primary, then promotion) instead of a
    /// planned switchover.
    #[arg(long)]
    pub crash: bool,
    /// With --crash: how long after the crash the standby is promoted.
    #[arg(long, default_value = "1s", value_parser = run::events::parse_duration)]
    pub promote_after: Duration,
    /// Writers that bypass the proxy: this many clients connected straight to the old
    /// primary, each overriding the read-only default (`BEGIN READ WRITE`, `SET SESSION
    /// CHARACTERISTICS … READ WRITE`, `SET transaction_read_only = off` in turn) and
    /// committing one insert per transaction, reconnecting on any error. Their
    /// acknowledged commits are checked against the new primary.
    #[arg(long, default_value_t = 0)]
    pub bypass_writers: usize,
    /// The handoff binary to run (default: the one next to this binary), e.g. an older
    /// build to compare with.
    #[arg(long)]
    pub handoff_bin: Option<PathBuf>,
    /// The handoff target as this many proxies coordinated over etcd (started for the
    /// run), all in front of the same cluster, `--clients` clients through each, loaded
    /// at the same time; the switchover is sent to the second one. Reported per proxy.
    #[arg(long, default_value_t = 1)]
    pub proxies: usize,
    /// With --proxies: no etcd, each proxy on its own (what it was like before
    /// coordination; works with older builds through --handoff-bin).
    #[arg(long)]
    pub uncoordinated: bool,
    /// The cluster's replication: `async` (PostgreSQL's default) or `sync` (the primary
    /// waits for the standby's flush: `synchronous_standby_names = '*'`).
    #[arg(long, value_enum, default_value = "async")]
    pub replication: Replication,
    /// Lower the standby's CPU priority (`renice` of its postmaster and processes), so
    /// that on a busy machine it replays behind the primary as a standby on a slower or
    /// busier host does: the replication lag a switchover has to deal with.
    #[arg(long, default_value_t = 0)]
    pub standby_nice: u8,
    /// A `HANDOFF_*` variable for the handoff target, `NAME=VALUE` (repeatable), e.g.
    /// `HANDOFF_SWITCHOVER_SYNC_TARGET=false`.
    #[arg(long = "handoff-env", value_parser = parse_env)]
    pub handoff_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if k.starts_with("HANDOFF_") => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not HANDOFF_NAME=VALUE")),
    }
}

/// How the standby replicates during a switchover run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Replication {
    Async,
    Sync,
}

impl Args {
    /// The load harness's options for these targets, events and bypassing writers.
    fn run_args(
        &self,
        targets: Vec<(String, String)>,
        target_events: Vec<(String, Event)>,
        bypass: Vec<(String, String, usize)>,
    ) -> RunArgs {
        RunArgs {
            targets,
            workload: self.workload,
            clients: self.clients,
            duration: self.duration,
            rate: None,
            events: Vec::new(),
            accounts: 100_000,
            out: self.out.clone(),
            quiet: self.quiet,
            target_events,
            bypass,
            cpu_of: Vec::new(),
            meta: Vec::new(),
        }
    }
}

/// Shell commands that crash `node` (kill -9 of the postmaster and all its children).
fn crash_command(node: &handoff_tests::Node) -> String {
    format!(
        "pm=$(head -1 {d}/postmaster.pid); kill -9 $pm $(pgrep -P $pm)",
        d = node.data.display()
    )
}

/// Seconds from an event that started at `started` (in this run, or in another run of
/// the same moment: proxies loaded together) plus `after` (the promotion, for a crash)
/// until a 0.5 s window reaches 90% of the throughput of the 2 s before the event.
/// `None` if it never does within the run.
pub fn recovery_from(r: &TargetResult, started: f64, after: f64) -> Option<f64> {
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
    let before = per_s((started - 2.0).max(0.0), started);
    if before <= 0.0 {
        return None;
    }
    let last = tl.last()?.t;
    let from = started + after;
    let mut t = from;
    while t + 0.5 <= last + bucket {
        if per_s(t, t + 0.5) >= 0.9 * before {
            return Some(t - from);
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
    if args.proxies == 0 {
        bail!("--proxies must be at least 1");
    }
    let mut clusters = Vec::new();
    let mut keep = Vec::new();
    let mut targets = Vec::new();
    let mut events = Vec::new();
    let mut bypass = Vec::new();
    let pg_ctl = |c: &Cluster| c.bin.bin("pg_ctl").display().to_string();
    if args.proxies > 1 && args.bypass_writers > 0 {
        bail!("--proxies and --bypass-writers do not go together");
    }
    let mut together = None;
    for name in &wanted {
        let cluster = tokio::task::block_in_place(|| -> Result<Cluster> {
            let c = Cluster::start(1)?;
            if args.crash || args.replication == Replication::Sync {
                c.make_synchronous()?;
            }
            if args.standby_nice > 0 {
                renice(&c.standbys[0], args.standby_nice)?;
            }
            Ok(c)
        })?;
        let port = free_port()?;
        let as_pg = as_server_user();
        // Crash, wait as an HA system would, promote.
        let crash_promote = format!(
            "{crash}; sleep {delay}; {as_pg}{ctl} -D {s} -w promote",
            crash = crash_command(&cluster.primary),
            delay = args.promote_after.as_secs_f64(),
            ctl = pg_ctl(&cluster),
            s = cluster.standbys[0].data.display(),
        );
        match *name {
            "handoff" if args.proxies > 1 => {
                together = Some(coordinated(&args, &cluster, &crash_promote).await?);
            }
            "handoff" => {
                let admin = free_port()?;
                let extra: Vec<(&str, String)> = args
                    .handoff_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                keep.push(match &args.handoff_bin {
                    Some(bin) => crate::compare::start_handoff_bin(
                        bin,
                        &cluster,
                        port,
                        admin,
                        args.pool_size,
                        &extra,
                    )?,
                    None => crate::compare::start_handoff_with(
                        &cluster,
                        port,
                        admin,
                        args.pool_size,
                        &extra,
                    )?,
                });
                wait_listening(port, "handoff").await?;
                targets.push((
                    "handoff".to_string(),
                    format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                ));
                let body = format!("{{\"to\": \"{}\"}}", cluster.standbys[0].addr());
                let command = if args.crash {
                    crash_promote.clone()
                } else {
                    format!("POST http://127.0.0.1:{admin}/v1/shards/main/switchover {body}")
                };
                events.push((
                    "handoff".to_string(),
                    Event {
                        at: args.at,
                        command,
                    },
                ));
            }
            "pgbouncer" => {
                let (pgb, mut script) = pgbouncer_for_switchover(&cluster, port).await?;
                if args.crash {
                    // No PAUSE: nobody knew in advance. Repoint after the promotion.
                    let ini = cluster.dir().join("pgbouncer.ini");
                    let console = format!(
                        "{} -X -q -h 127.0.0.1 -p {port} -U postgres pgbouncer -c",
                        cluster.bin.bin("psql").display()
                    );
                    script = format!(
                        "{crash_promote}; sed -i 's/port={old}/port={new}/' {ini}; {console} RELOAD",
                        old = cluster.primary.port,
                        new = cluster.standbys[0].port,
                        ini = ini.display(),
                    );
                }
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
                let command = if args.crash {
                    crash_promote.clone()
                } else {
                    format!(
                        "set -e; {as_pg}{ctl} -D {p} -m fast -w stop; {as_pg}{ctl} -D {s} -w promote",
                        ctl = pg_ctl(&cluster),
                        p = cluster.primary.data.display(),
                        s = cluster.standbys[0].data.display(),
                    )
                };
                events.push((
                    "direct".to_string(),
                    Event {
                        at: args.at,
                        command,
                    },
                ));
            }
        }
        if args.bypass_writers > 0 {
            let primary = format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                cluster.primary.port
            );
            handoff_tests::bypass::prepare(&primary, None).await?;
            bypass.push((
                name.to_string(),
                cluster.primary.addr(),
                args.bypass_writers,
            ));
        }
        clusters.push(cluster);
    }
    let run_args = args.run_args(targets, events, bypass);
    let mut results = if run_args.targets.is_empty() {
        Vec::new()
    } else {
        run::run(run_args).await?
    };
    if let Some(c) = together {
        results.extend(run::run_together(c.run_args).await?);
        drop(c.processes);
    }
    println!();
    println!(
        "{:<10} {:>8} {:>7} {:>10} {:>9} {:>9} {:>11} {:>9}  {}",
        "target",
        "tps",
        "errors",
        "stall ms",
        "p99.9 ms",
        "max ms",
        if args.crash {
            "recover s*"
        } else {
            "recover s"
        },
        "lost",
        if args.crash {
            "crash and promotion"
        } else {
            "switchover"
        }
    );
    // With several proxies loaded together, the one event is in one proxy's run.
    let event_start = results
        .iter()
        .find_map(|r| r.events.first().map(|e| e.started));
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
            ev.map(|e| e.started)
                .or(event_start)
                .and_then(|t| recovery_from(
                    r,
                    t,
                    if args.crash {
                        args.promote_after.as_secs_f64()
                    } else {
                        0.0
                    }
                ))
                .map_or("never".to_string(), |s| format!("{s:.2}")),
            r.lost_writes.len(),
            ev.map_or(String::new(), |e| e.span()),
        );
    }
    for r in &results {
        if r.name.starts_with("handoff") && !args.crash && !r.events.is_empty() {
            if let Some(e) = r.events.first() {
                println!("\nhandoff's switchover report:\n{}", e.output.trim());
                if let Some(summary) = report_summary(&e.output) {
                    println!("{summary}");
                }
            }
        }
        for (k, n) in &r.errors {
            println!("  {}: {n} × {k}", r.name);
        }
    }
    if args.bypass_writers > 0 {
        println!(
            "\nwriters bypassing the proxy ({} straight to the old primary):",
            args.bypass_writers
        );
        println!(
            "{:<10} {:>14} {:>9}  per writer (acknowledged / missing)",
            "target", "acknowledged", "missing"
        );
        for (r, c) in results.iter().zip(&clusters) {
            let new = format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                c.standbys[0].port
            );
            let on_new = handoff_tests::bypass::ids(&new).await?;
            let mut per = Vec::new();
            let (mut acked, mut missing) = (0, 0);
            for w in &r.bypass {
                let m = w.acks.iter().filter(|a| !on_new.contains(&a.id)).count();
                acked += w.acks.len();
                missing += m;
                per.push(format!("{}: {}/{}", w.mode.name(), w.acks.len(), m));
            }
            println!(
                "{:<10} {:>14} {:>9}  {}",
                r.name,
                acked,
                missing,
                per.join(", ")
            );
        }
    }
    if args.crash {
        println!(
            "\n* recover s: from the promotion ({:?} after the crash) to 90% of the throughput before the crash",
            args.promote_after
        );
    }
    drop(keep);
    drop(clusters);
    Ok(())
}

/// Several proxies over etcd for one run: what runs them, and the processes to stop.
struct Together {
    run_args: RunArgs,
    processes: Vec<crate::compare::Kill>,
    _etcd: Option<handoff_tests::etcd::Etcd>,
}

/// Starts etcd and `--proxies` handoff processes coordinated through it, in front of
/// `cluster`; the event (the switchover, or the crash) goes with the second proxy's run.
async fn coordinated(args: &Args, cluster: &Cluster, crash_promote: &str) -> Result<Together> {
    let etcd = if args.uncoordinated {
        None
    } else {
        Some(tokio::task::block_in_place(
            handoff_tests::etcd::Etcd::start,
        )?)
    };
    let bin = match &args.handoff_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("handoff"),
    };
    let mut processes = Vec::new();
    let mut targets = Vec::new();
    let mut admins = Vec::new();
    for i in 1..=args.proxies {
        let (port, admin) = (free_port()?, free_port()?);
        let extra: Vec<(&str, String)> = match &etcd {
            Some(e) => vec![
                ("HANDOFF_ETCD_ENDPOINTS", e.endpoint()),
                ("HANDOFF_PROXY_ID", format!("p{i}")),
            ],
            None => Vec::new(),
        };
        processes.push(crate::compare::start_handoff_bin(
            &bin,
            cluster,
            port,
            admin,
            args.pool_size,
            &extra,
        )?);
        wait_listening(port, "handoff").await?;
        targets.push((
            format!("handoff-p{i}"),
            format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        ));
        admins.push(admin);
    }
    // Every proxy has registered: each sees them all.
    for admin in admins.iter().filter(|_| etcd.is_some()) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let addr = format!("127.0.0.1:{admin}").parse()?;
            let seen = match handoff_tests::raw::http(addr, "GET", "/v1/shards", None).await {
                Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["coordination"]["members"].as_array().map(Vec::len))
                    .unwrap_or(0),
                _ => 0,
            };
            if seen == args.proxies {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("the proxies did not all see each other in etcd within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let body = format!("{{\"to\": \"{}\"}}", cluster.standbys[0].addr());
    let command = if args.crash {
        crash_promote.to_string()
    } else {
        format!(
            "POST http://127.0.0.1:{}/v1/shards/main/switchover {body}",
            admins[1]
        )
    };
    let event = Event {
        at: args.at,
        command,
    };
    let run_args = args.run_args(targets, vec![("handoff-p2".to_string(), event)], Vec::new());
    Ok(Together {
        run_args,
        processes,
        _etcd: etcd,
    })
}

/// One line from handoff's switchover report (the JSON the admin API answered): the
/// target's replay lag when the fence took the old primary's LSN, and each step's time.
fn report_summary(output: &str) -> Option<String> {
    let start = output.find('{')?;
    let report: serde_json::Value = serde_json::from_str(output[start..].trim()).ok()?;
    let lag = report["lag_at_revoke_bytes"]
        .as_f64()
        .map_or("-".to_string(), |b| format!("{:.1} KiB", b / 1024.0));
    let steps: Vec<String> = report["steps"]
        .as_array()?
        .iter()
        .map(|s| {
            format!(
                "{} {:.0} ms",
                s["step"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    Some(format!(
        "lag at revocation: {lag}; synchronous target: {}; steps: {}",
        report["sync_target"].as_str().unwrap_or("-"),
        steps.join(", ")
    ))
}

/// `renice` of a server's postmaster and every process it started.
fn renice(node: &handoff_tests::Node, nice: u8) -> Result<()> {
    let pids: Vec<String> = node.pids()?.iter().map(u32::to_string).collect();
    let out = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&pids)
        .output()?;
    if !out.status.success() {
        bail!("renice: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod report_tests {
    use super::report_summary;

    #[test]
    fn the_summary_reads_the_lag_and_the_steps() {
        let out = "HTTP 200\n{\"lag_at_revoke_bytes\": 2048.0, \"sync_target\": \"standby1\", \"steps\": [{\"step\": \"precheck\", \"ms\": 3.2}, {\"step\": \"catch_up\", \"ms\": 1.0}]}";
        assert_eq!(
            report_summary(out).unwrap(),
            "lag at revocation: 2.0 KiB; synchronous target: standby1; steps: precheck 3 ms, catch_up 1 ms"
        );
        assert_eq!(report_summary("no json"), None);
    }
}
